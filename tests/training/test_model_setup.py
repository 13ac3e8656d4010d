"""Head construction options of a training run."""

from __future__ import annotations

import pytest
import torch

from training.config import ConnectorSection, ModelSection
from training.model_setup import build_head


def test_queries_start_as_the_mllms_embeddings_of_a_text(mllm_loader, decoder_loader):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    cfg = ModelSection(num_queries=5, queries_init_text="a red", connector=ConnectorSection(depth=1))
    head = build_head(cfg, mllm, decoder)
    ids = mllm.tokenizer("a red", add_special_tokens=False)["input_ids"]
    emb = mllm.language_model.get_input_embeddings().weight
    expected = emb[torch.tensor((ids * 5)[:5])]
    assert torch.equal(head.queries.queries.detach(), expected.float())
    assert head.queries.queries.requires_grad  # still trainable, still not the frozen embedding table
    assert head.queries.queries.data_ptr() != emb.data_ptr()


def test_empty_init_text_is_refused(mllm_loader, decoder_loader):
    cfg = ModelSection(num_queries=4, queries_init_text="", connector=ConnectorSection(depth=1))
    with pytest.raises(ValueError, match="has no tokens"):
        build_head(cfg, mllm_loader("qwen2_5_vl"), decoder_loader("sana"))
