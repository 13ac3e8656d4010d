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


def test_slot_embed_gives_one_slot_per_query(mllm_loader, decoder_loader):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    on = build_head(ModelSection(num_queries=6, connector=ConnectorSection(depth=1, slot_embed=True)), mllm, decoder)
    off = build_head(ModelSection(num_queries=6, connector=ConnectorSection(depth=1)), mllm, decoder)
    assert on.connector.cfg.num_slots == 6 and on.connector.slot_embed.shape == (6, decoder.text_width)
    assert off.connector.cfg.num_slots == 0 and off.connector.slot_embed is None


def test_empty_init_text_is_refused(mllm_loader, decoder_loader):
    cfg = ModelSection(num_queries=4, queries_init_text="", connector=ConnectorSection(depth=1))
    with pytest.raises(ValueError, match="has no tokens"):
        build_head(cfg, mllm_loader("qwen2_5_vl"), decoder_loader("sana"))


def test_train_shift_reaches_the_flow_decoder_and_is_refused_elsewhere(mllm_folder, decoder_loader):
    from training.model_setup import load_models

    sana, sd15 = decoder_loader("sana").source, decoder_loader("sd15").source
    _, decoder = load_models(
        ModelSection(mllm=str(mllm_folder("qwen2_5_vl")), decoder=str(sana), train_shift=3.0), torch.device("cpu")
    )
    assert decoder.train_shift == 3.0
    # shift 3 puts the median noise level at 0.75 instead of 0.5: x_t holds three parts noise to one part image
    x0, noise, u = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.full((1,), 0.5)
    x_t, _, _ = decoder.training_inputs(x0, noise, u)
    assert torch.allclose(x_t, torch.full_like(x_t, 0.75))
    with pytest.raises(ValueError, match="flow-matching decoders"):
        load_models(
            ModelSection(mllm=str(mllm_folder("qwen2_5_vl")), decoder=str(sd15), train_shift=3.0), torch.device("cpu")
        )
    with pytest.raises(ValueError, match="train_shift must be > 0"):
        ModelSection(train_shift=0.0)
