"""Importing checkpoints of the MetaQuery reference trainer: a folder laid out as that trainer saves its `MetaQuery`
model (config.json with model_type "metaquery", the whole model's tensors under `model.mllm_backbone.`,
`model.connector.`, `model.transformer.`, `vae.`), built here from tiny models, must import into a head whose query
states and conditioning equal what the reference computes.

The reference's computation is written out in `tests/reference_kit.py` from its published description (Qwen2 encoder layers from
transformers, RoPE then a per-head RMS qk-norm, no final encoder norm, diffusers' RMSNorm on the output; queries as
added vocabulary rows after "\\n<begin_of_img>"), independently of this pack's connector code."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from mq_testutil import odd_modes, umask
from reference_kit import SYSTEM, reference_connector, write_reference_folder
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from metaqueries_core.checkpoint import apply_decoder_state, check_compatible, load_checkpoint
from metaqueries_core.connector import Connector
from metaqueries_core.decoders import load_decoder
from metaqueries_core.importers.reference import (
    connector_config,
    connector_state,
    import_reference,
    is_reference_folder,
    load_reference,
    main,
)
from metaqueries_core.importers.weights import WeightsFolder
from metaqueries_core.sampling import Guidance, generate


def test_reference_connector_layout_is_reproduced(tmp_path):
    ref = reference_connector(128, 48, depth=2)  # two heads: the per-head scales differ
    with torch.no_grad():  # small inputs to the output norm, where its eps shows
        ref[3].weight.mul_(0.01), ref[3].bias.mul_(0.01)
    save_file({f"model.connector.{k}": v for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    state = connector_state(WeightsFolder(tmp_path))
    cfg = connector_config(state, 128, "sana")
    assert (cfg.depth, cfg.num_heads, cfg.out_width, cfg.layer_style) == (2, 2, 48, "reference")
    ours = Connector(cfg).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 7, 128)  # (B, N, W)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        for layer in ours.layers:  # the test can fail: normalising before RoPE gives another result
            layer.attn.norm_after_rope = False
        assert (ours(x) - expected).abs().max() > 1e-2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root, mllm_folder, decoder_loader):
    decoder_loader("sana")  # writes the tiny Sana folder
    root = tmp_path_factory.mktemp("reference")
    mllm_path, decoder_path = mllm_folder("qwen2_5_vl"), tiny_root / "decoder_sana"
    connector, added, tuned = write_reference_folder(root / "checkpoint-1000", mllm_path, decoder_path)
    return root, mllm_path, decoder_path, connector, added, tuned


def reference_query_states(mllm_path, mllm, added, prompt, num_queries):
    """The reference's read-out for one unpadded prompt: the MLLM with its vocabulary grown by the added rows,
    fed "<template>\\n<begin_of_img><img0>..<imgN-1><end_of_img>" as token ids; states at the <img*> positions."""
    model = AutoModelForImageTextToText.from_pretrained(mllm_path).eval()
    base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(base + num_queries + 2)
    with torch.no_grad():
        model.get_input_embeddings().weight[base:] = added
    text_ids = mllm.tokenizer(mllm.render(prompt, 0, SYSTEM) + "\n", add_special_tokens=False)["input_ids"]
    ids = text_ids + [base] + [base + 2 + i for i in range(num_queries)] + [base + 1]
    with torch.no_grad():
        states = model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, L, D)
    return states[0, len(text_ids) + 1 : len(text_ids) + 1 + num_queries]  # (N, D)


def test_imported_head_computes_what_the_reference_does(reference, mllm_loader, tmp_path):
    root, mllm_path, decoder_path, connector, added, tuned = reference
    config = import_reference(root / "checkpoint-1000", tmp_path / "imported.safetensors")
    assert (config.mllm_family, config.decoder_family, config.num_queries, config.lead_slots) == (
        "qwen2_5_vl",
        "sana",
        8,
        1,
    )
    assert (config.prompt_suffix, config.system_prompt, config.mllm_name) == ("\n", SYSTEM, "Qwen2.5-VL-3B-Instruct")
    loaded, head, decoder_state = load_checkpoint(tmp_path / "imported.safetensors")
    mllm, decoder = mllm_loader("qwen2_5_vl"), load_decoder(decoder_path)
    check_compatible(loaded, mllm=mllm, decoder=decoder)

    prompts = ["a red circle", "two blue squares above a green triangle on the left"]  # left padding in the batch
    with torch.no_grad():
        states = head.states(mllm, head.prepare(mllm, prompts))  # (2, N, D)
        for i, prompt in enumerate(prompts):
            expected = reference_query_states(mllm_path, mllm, added, prompt, 8)
            torch.testing.assert_close(states[i], expected, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(
                head.connector(states[i : i + 1]), connector(expected[None]), atol=2e-5, rtol=1e-5
            )

    assert decoder_state.keys() == tuned.keys()
    assert all(torch.equal(decoder_state[k], tuned[k]) for k in tuned)
    apply_decoder_state(decoder, decoder_state)
    images = generate(mllm, head, decoder, ["a red circle"], height=32, width=32, steps=2, guidance=Guidance(scale=3.0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_the_mllm_family_is_read_from_the_weights(family, reference, mllm_folder, mllm_loader, tmp_path):
    """LLaVA-OneVision (the reference's other family) and Qwen2-VL are told apart from Qwen2.5-VL by their tensors."""
    folder = tmp_path / family
    _, added, _ = write_reference_folder(folder, mllm_folder(family), reference[2])
    config = import_reference(folder, tmp_path / "imported.safetensors")
    _, head, _ = load_checkpoint(tmp_path / "imported.safetensors")
    mllm = mllm_loader(family)
    assert config.mllm_family == family
    assert config.image_crop == (384 if family == "llava_onevision" else None)  # as the reference feeds its images
    assert config.min_image_tokens == (None if family == "llava_onevision" else 256)  # its Qwen min_pixels
    check_compatible(config, mllm=mllm)
    with torch.no_grad():
        states = head.states(mllm, head.prepare(mllm, ["a red circle"]))[0]
    torch.testing.assert_close(states, reference_query_states(mllm_folder(family), mllm, added, "a red circle", 8))


def test_frozen_decoder_is_left_out_and_options_override(reference, tmp_path):
    folder = tmp_path / "frozen_decoder"
    write_reference_folder(folder, reference[1], reference[2], freeze_decoder=True)
    import_reference(folder, tmp_path / "auto.safetensors")
    assert load_checkpoint(tmp_path / "auto.safetensors")[2] == {}
    import_reference(folder, tmp_path / "include.safetensors", decoder="include", stage="instruct")
    config, _, decoder_state = load_checkpoint(tmp_path / "include.safetensors")
    assert decoder_state and config.stage == "instruct"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_imported_checkpoint_has_the_umask_mode(reference, tmp_path, mask):
    """Not safetensors' owner-only 0600: ComfyUI may run as another user than the import."""
    with umask(mask):
        out = tmp_path / "out" / "imported.safetensors"
        import_reference(reference[0] / "checkpoint-1000", out, decoder="include")
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask and odd_modes(tmp_path / "out", mask) == {}


def test_bad_inputs_are_named(reference, tmp_path):
    root = reference[0]
    with pytest.raises(ValueError, match="training run folder; pass one of its checkpoints: checkpoint-1000"):
        import_reference(root, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_reference(tmp_path / "nowhere", tmp_path / "x.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl'; a reference MetaQuery checkpoint has 'metaquery'"):
        import_reference(other, tmp_path / "x.safetensors")
    (other / "config.json").write_text(json.dumps({"model_type": "metaquery", "num_metaqueries": 4}))
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        import_reference(other, tmp_path / "x.safetensors")
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists"):
        import_reference(root / "checkpoint-1000", existing)
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.connector.0.layers.1.mlp.up_proj.weight", torch.zeros(7, 3), r"1 of the wrong shape \['connector"),
        ("model.connector.0.layers.0.self_attn.q_norm.gamma", None, r"has no model\.connector\.0\.layers\.0\."),
    ],
)
def test_connector_tensors_that_do_not_fit_are_named(reference, tmp_path, key, value, message):
    folder = tmp_path / "damaged"
    shutil.copytree(reference[0] / "checkpoint-1000", folder)
    shard = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, str(shard))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != key or value is not None}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        import_reference(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_command_line(reference, tmp_path, capsys):
    root = reference[0]
    assert main([str(root / "checkpoint-1000"), str(tmp_path / "cli.safetensors"), "--decoder=skip"]) == 0
    assert "8 queries for MLLM family 'qwen2_5_vl' (width 64)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cli.safetensors")[2] == {}
    assert main([str(root), str(tmp_path / "bad.safetensors")]) == 2
    assert "training run folder" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_pytorch_bin_folders_import_alike(reference, tmp_path):
    """A folder saved without safetensors (one pytorch_model.bin, read with weights_only) imports the same head."""
    root = reference[0]
    source = root / "checkpoint-1000"
    weights = WeightsFolder(source)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(weights.get_many(weights.keys()), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((source / "config.json").read_text())
    import_reference(source, tmp_path / "st.safetensors")
    import_reference(folder, tmp_path / "bin.safetensors")
    a, b = load_checkpoint(tmp_path / "st.safetensors"), load_checkpoint(tmp_path / "bin.safetensors")
    assert a[0].connector == b[0].connector
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_unreadable_weight_files_are_named(tmp_path, name):
    (tmp_path / name).write_bytes(b"not weights at all")
    with pytest.raises(ValueError, match=f"{name}' is not a readable"):
        WeightsFolder(tmp_path)


def test_load_reference_reads_in_memory_what_import_writes(reference, tmp_path):
    folder = reference[0] / "checkpoint-1000"
    assert is_reference_folder(folder) and not is_reference_folder(reference[0]) and not is_reference_folder(tmp_path)
    config, head, decoder_state = load_reference(folder)
    import_reference(folder, tmp_path / "x.safetensors")
    saved_config, saved_head, saved_decoder = load_checkpoint(tmp_path / "x.safetensors")
    assert config == saved_config
    a, b = head.state_dict(), saved_head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k]) for k in a)
    assert decoder_state.keys() == saved_decoder.keys() and all(
        torch.equal(decoder_state[k], saved_decoder[k]) for k in saved_decoder
    )


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda c: [c], r"model_type 'none \(a JSON list\)'"),
        (lambda c: {**c, "num_metaqueries": "eight"}, r"num_metaqueries 'eight'; it must be a whole number >= 1"),
        (lambda c: {**c, "connector_num_hidden_layers": "2"}, r"connector_num_hidden_layers '2'; it must be a whole"),
        (lambda c: {**c, "max_input_text_tokens": 0}, r"max_input_text_tokens 0; it must be a whole number >= 1"),
    ],
)
def test_config_values_of_the_wrong_kind_are_named(reference, tmp_path, change, says):
    folder = tmp_path / "ckpt"
    shutil.copytree(reference[0] / "checkpoint-1000", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ValueError, match=says):
        import_reference(folder, tmp_path / "x.safetensors")
    assert main([str(folder), str(tmp_path / "x.safetensors")]) == 2  # one error line, no traceback
    assert not (tmp_path / "x.safetensors").exists()
