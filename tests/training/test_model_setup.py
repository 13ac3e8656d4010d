"""Head construction options of a training run."""

from __future__ import annotations

import pytest
import torch

from metaqueries_core.checkpoint import config_for, save_checkpoint
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


def test_min_image_tokens_reaches_a_qwen_head_and_is_refused_for_fixed_tiles(mllm_loader, decoder_loader):
    cfg = ModelSection(num_queries=4, min_image_tokens=256, connector=ConnectorSection(depth=1))
    assert build_head(cfg, mllm_loader("qwen2_5_vl"), decoder_loader("sana")).min_image_tokens == 256
    with pytest.raises(ValueError, match=r"min_image_tokens is set, but .* \(llava_onevision\) gives every image"):
        build_head(cfg, mllm_loader("llava_onevision"), decoder_loader("sana"))


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


def test_init_checkpoint_loads_the_head_it_holds_and_refuses_a_config_describing_another(
    tmp_path, mllm_loader, decoder_loader
):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    section = ModelSection(num_queries=6, connector=ConnectorSection(depth=2, heads=4, slot_embed=True))
    trained = build_head(section, mllm, decoder)
    ckpt = save_checkpoint(tmp_path / "pre.safetensors", trained, config_for(trained, mllm=mllm, decoder=decoder))

    same = dict(num_queries=6, init_checkpoint=str(ckpt), connector=ConnectorSection(depth=2, heads=4, slot_embed=True))
    loaded = build_head(ModelSection(**same), mllm, decoder)
    assert torch.equal(loaded.queries.queries, trained.queries.queries)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    # initialisation-only settings do not describe the trained head (its weights replace what they set)
    init_only = ConnectorSection(depth=2, heads=4, slot_embed=True, init_std=0.5, out_norm_scale=3.0)
    again = build_head(ModelSection(**{**same, "connector": init_only, "queries_init_text": "a red"}), mllm, decoder)
    assert torch.equal(again.queries.queries, trained.queries.queries)

    other = ModelSection(
        num_queries=8,
        init_checkpoint=str(ckpt),
        max_prompt_tokens=64,
        connector=ConnectorSection(depth=3, heads=4, layer_style="siglip"),
    )
    with pytest.raises(ValueError, match="holds a different head than this config describes") as err:
        build_head(other, mllm, decoder)
    for part in (
        "model.num_queries 8 (checkpoint 6)",
        "model.max_prompt_tokens 64 (checkpoint 256)",
        "model.connector.slot_embed False (checkpoint True)",
        "model.connector.depth 3 (checkpoint 2)",
        "model.connector.layer_style 'siglip' (checkpoint 'qwen2')",
    ):
        assert part in str(err.value)
    assert "heads" not in str(err.value)  # 4 on both sides


def test_reference_layout_with_a_lead_slot_trains_and_reloads(tmp_path, mllm_loader, decoder_loader):
    """The settings an imported reference checkpoint has (metaqueries_core.importers) are trainable keys: the lead
    slot gets gradient although its state is not read out, and init_checkpoint names a config that leaves them out."""
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    connector = ConnectorSection(depth=1, layer_style="reference", out_norm_eps=1e-5)
    section = ModelSection(num_queries=4, prompt_suffix="\n", lead_slots=1, connector=connector)
    head = build_head(section, mllm, decoder)
    assert head.queries().shape == (5, mllm.width)  # lead slot first
    cond, _ = head.encode(mllm, ["a red circle", "a blue square on the left"])
    assert cond.shape == (2, 4, decoder.text_width)
    cond.square().mean().backward()
    assert head.queries.lead.grad.abs().sum() > 0 and head.queries.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in mllm.model.parameters())

    ckpt = save_checkpoint(tmp_path / "ref.safetensors", head, config_for(head, mllm=mllm, decoder=decoder))
    same = ModelSection(**{**section.__dict__, "init_checkpoint": str(ckpt)})
    assert torch.equal(build_head(same, mllm, decoder).queries.lead, head.queries.lead)
    with pytest.raises(ValueError, match="holds a different head") as err:
        build_head(ModelSection(num_queries=4, init_checkpoint=str(ckpt), connector=connector), mllm, decoder)
    assert "model.prompt_suffix '' (checkpoint '\\n')" in str(err.value)
    assert "model.lead_slots 0 (checkpoint 1)" in str(err.value)
