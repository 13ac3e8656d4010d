"""Checkpoint format: exact round trip, metadata config, compatibility errors, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from metaqueries_core import checkpoint as ckpt
from metaqueries_core.images import resize_center_crop


@pytest.fixture
def saved(tmp_path, mllm_loader, decoder_loader, make_head):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder)
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder, stage="instruct")
    return ckpt.save_checkpoint(tmp_path / "mq.safetensors", head, config), head, config


def test_round_trip_is_exact(saved):
    path, head, config = saved
    loaded_config, loaded, decoder_state = ckpt.load_checkpoint(path)
    assert loaded_config == config and decoder_state == {}
    a, b = head.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.system_prompt == head.system_prompt and loaded.max_prompt_tokens == head.max_prompt_tokens


def test_version_1_checkpoints_load_with_the_defaults_they_meant(saved, tmp_path):
    """Version 2 added prompt_suffix, lead_slots and the connector's out_norm_eps, version 3 image_crop and version 4
    min_image_tokens; a version-1 file has none."""
    path, head, _ = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        data = json.loads(f.metadata()[ckpt.METADATA_KEY])
    for key in ("prompt_suffix", "lead_slots", "image_crop", "min_image_tokens"):
        del data[key]
    del data["connector"]["out_norm_eps"]
    data["format_version"] = 1
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={ckpt.METADATA_KEY: json.dumps(data), "format": "pt"})
    config, loaded, _ = ckpt.load_checkpoint(old)
    assert (config.prompt_suffix, config.lead_slots, config.connector.out_norm_eps) == ("", 0, 1e-6)
    assert config.image_crop is None and loaded.image_crop is None
    assert config.min_image_tokens is None and loaded.min_image_tokens is None
    states = torch.randn(2, head.num_queries, head.queries.width)
    torch.testing.assert_close(loaded.connect(states)[0], head.connect(states)[0], rtol=0, atol=0)


def head_round_trip(tmp_path, mllm, decoder, *, connector_options: dict | None = None, **settings):
    """A 4-query head with these settings (a 1-layer connector with `connector_options`), saved and loaded: (its
    connector config, head, loaded config, loaded head)."""
    from metaqueries_core.connector import ConnectorConfig
    from metaqueries_core.head import MetaQueryHead

    options = connector_options or {}
    connector = ConnectorConfig(in_width=mllm.width, out_width=decoder.text_width, depth=1, **options)
    head = MetaQueryHead(num_queries=4, connector=connector, **settings)
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder)
    loaded_config, loaded, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "head.safetensors", head, config))
    return connector, head, loaded_config, loaded


def test_lead_slots_and_prompt_suffix_round_trip(tmp_path, mllm_loader, decoder_loader):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    _, head, loaded_config, loaded = head_round_trip(
        tmp_path, mllm, decoder, connector_options={"layer_style": "reference"}, prompt_suffix="\n", lead_slots=2
    )
    assert (loaded_config.prompt_suffix, loaded_config.lead_slots) == ("\n", 2)
    assert torch.equal(loaded.queries.lead, head.queries.lead) and loaded.layout.suffix == "\n"
    batch = loaded.prepare(mllm, ["a red circle"])
    suffix_id = mllm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    assert batch.num_queries == 6 and batch.input_ids[0, -7] == suffix_id  # the suffix, then 2 + 4 slots


def test_image_crop_round_trips_and_crops_what_the_mllm_sees(tmp_path, mllm_loader, decoder_loader, monkeypatch):
    from metaqueries_core.head import MetaQueryHead

    mllm = mllm_loader("qwen2_5_vl")
    connector, _, loaded_config, loaded = head_round_trip(tmp_path, mllm, decoder_loader("sana"), image_crop=28)
    assert loaded_config.image_crop == 28 and loaded.image_crop == 28
    seen = []
    original = mllm.prepare
    monkeypatch.setattr(mllm, "prepare", lambda p, images, **kw: seen.append(images) or original(p, images, **kw))
    wide = Image.new("RGB", (84, 56), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 56))  # a blue band on the left that the centre crop cuts away
    loaded.prepare(mllm, ["make it green"], [[wide]])
    (shown,) = seen[0][0]
    assert shown.size == (28, 28) and shown.getcolors() == [(28 * 28, (255, 0, 0))]
    gradient = Image.linear_gradient("L").resize((84, 56)).convert("RGB")
    loaded.prepare(mllm, ["x"], [[gradient.quantize(64)]])  # a palette image: cropped as the RGB image it shows
    expected = resize_center_crop(gradient.quantize(64).convert("RGB"), 28)
    assert np.array_equal(np.asarray(seen[1][0][0]), np.asarray(expected))
    with pytest.raises(ValueError, match="image_crop must be a side in pixels >= 1 or None"):
        MetaQueryHead(num_queries=4, connector=connector, image_crop=0)


def test_min_image_tokens_round_trips_and_sizes_what_the_mllm_sees(tmp_path, mllm_loader, decoder_loader):
    from metaqueries_core.head import MetaQueryHead

    mllm = mllm_loader("qwen2_5_vl")
    connector, _, loaded_config, loaded = head_round_trip(tmp_path, mllm, decoder_loader("sana"), min_image_tokens=16)
    assert loaded_config.min_image_tokens == 16 and loaded.min_image_tokens == 16
    small = [[Image.new("RGB", (16, 16), (255, 0, 0))]]
    for model, tokens in ((loaded, 16), (MetaQueryHead(num_queries=4, connector=connector), 4)):
        batch = model.prepare(mllm, ["make it green"], small)
        assert int((batch.input_ids == mllm.image_token_id).sum()) == tokens
    with pytest.raises(ValueError, match="min_image_tokens must be >= 1 or None"):
        MetaQueryHead(num_queries=4, connector=connector, min_image_tokens=0)


def test_slot_embedding_round_trips(tmp_path, mllm_loader, decoder_loader, make_head):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder, slot_embed=True)
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder, stage="pretrain")
    _, loaded, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "slots.safetensors", head, config))
    assert loaded.connector.cfg.num_slots == head.num_queries
    torch.testing.assert_close(loaded.connector.slot_embed, head.connector.slot_embed, rtol=0, atol=0)
    states = torch.randn(2, head.num_queries, mllm.width)
    torch.testing.assert_close(loaded.connect(states)[0], head.connect(states)[0], rtol=0, atol=0)


def test_file_layout_matches_the_design(saved):
    path, head, config = saved
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[ckpt.METADATA_KEY])
    assert "queries" in keys and all(k == "queries" or k.startswith("connector.") for k in keys)
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["mllm_family"] == "qwen2_5_vl" and meta["decoder_family"] == "sana" and meta["stage"] == "instruct"
    assert meta["connector"]["depth"] == 1 and meta["num_queries"] == head.num_queries


def test_decoder_weights_travel_when_given(tmp_path, saved, decoder_loader):
    _, head, config = saved
    state = {k: v for k, v in list(decoder_loader("sana").denoiser.state_dict().items())[:3]}
    path = ckpt.save_checkpoint(tmp_path / "with_decoder.safetensors", head, config, decoder_state=state)
    _, _, decoder_state = ckpt.load_checkpoint(path)
    assert decoder_state.keys() == state.keys() and all(torch.equal(decoder_state[k], state[k]) for k in state)


def test_mismatched_models_name_both_widths(saved, mllm_loader, decoder_loader, tmp_path):
    path, head, config = saved
    ckpt.check_compatible(config, mllm=mllm_loader("qwen2_5_vl"), decoder=decoder_loader("sana"))
    with pytest.raises(ValueError, match=r"decoder text width: checkpoint 64, loaded decoder 32"):
        ckpt.check_compatible(config, decoder=decoder_loader("sd15"))
    wide = ckpt.MetaQueryConfig(**{**config.__dict__, "mllm_width": 128})
    with pytest.raises(ValueError, match=r"MLLM width: checkpoint 128, loaded MLLM 64"):
        ckpt.check_compatible(wide, mllm=mllm_loader("qwen2_5_vl"))
    with pytest.raises(ValueError, match=r"MLLM family: checkpoint 'qwen2_5_vl', loaded 'qwen2'"):
        ckpt.check_compatible(config, mllm=mllm_loader("qwen2"))


def test_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="is not a MetaQuery checkpoint"):
        ckpt.load_checkpoint(plain)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.safetensors")
    json_file = tmp_path / "config.json"
    json_file.write_text('{"model_type": "sana"}')
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(plain.read_bytes()[:20])  # a copy cut short, as an interrupted download leaves it
    for bad in (json_file, truncated):
        with pytest.raises(ValueError, match=r"is not a readable \.safetensors file .*expected a MetaQuery checkpoint"):
            ckpt.load_checkpoint(bad)


def test_unknown_or_newer_config_is_refused(saved):
    _, _, config = saved
    data = json.loads(config.to_json())
    with pytest.raises(ValueError, match="unknown keys \\['typo'\\]"):
        ckpt.MetaQueryConfig.from_json(json.dumps({**data, "typo": 1}))
    with pytest.raises(ValueError, match="newer than this code"):
        ckpt.MetaQueryConfig.from_json(json.dumps({**data, "format_version": 99}))


def test_failed_write_keeps_previous_file(saved, monkeypatch):
    path, head, config = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, head, config)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_config_head_mismatch_refused(saved, tmp_path):
    _, head, config = saved
    bad = ckpt.MetaQueryConfig(**{**config.__dict__, "num_queries": 3})
    with pytest.raises(ValueError, match=r"head has num_queries 8 \(config 3\)"):
        ckpt.save_checkpoint(tmp_path / "x.safetensors", head, bad)


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(template="no place for it"), "has no '\\{caption\\}' where the caption goes"),
        (dict(empty="Generate an image."), "an empty-caption prompt needs a prompt template"),
    ],
)
def test_bad_prompt_layout_is_named(layout, message):
    from metaqueries_core.mllm import PromptLayout

    with pytest.raises(ValueError, match=message):
        PromptLayout(**layout)


def test_head_keys_are_the_heads_constructor_arguments(saved):
    """HEAD_KEYS is the one list a checkpoint config and a training config rebuild the head from."""
    import inspect

    from metaqueries_core.head import HEAD_KEYS, MetaQueryHead

    _, head, config = saved
    assert tuple(inspect.signature(MetaQueryHead.__init__).parameters)[1:] == HEAD_KEYS
    assert tuple(head.settings()) == HEAD_KEYS and tuple(config.head_settings()) == HEAD_KEYS


def test_a_file_whose_tensors_do_not_fit_its_config_is_named(saved, tmp_path):
    path, _, _ = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "queries"}
        metadata = f.metadata()
    tensors["connector.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata=metadata)
    with pytest.raises(
        ValueError, match=r"does not match its own config: 1 missing \[.queries.queries.\]; 1 unexpected"
    ):
        ckpt.load_checkpoint(tmp_path / "odd.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: "{not json", r"not valid JSON"),
        (lambda d: {k: v for k, v in d.items() if k != "mllm_width"}, r"lacks the required keys \['mllm_width'\]"),
        (lambda d: {k: v for k, v in d.items() if k != "connector"}, r"ConnectorConfig is missing or not an object"),
        (lambda d: {**d, "connector": {**d["connector"], "typo": 1}}, r"ConnectorConfig has unknown keys \['typo'\]"),
        (
            lambda d: {**d, "format_version": ckpt.FORMAT_VERSION + 1, "new_field": 1},
            rf"format version {ckpt.FORMAT_VERSION + 1} is newer than this code's {ckpt.FORMAT_VERSION}",
        ),
        (lambda d: {**d, "format_version": "2"}, r"format_version must be an integer, got '2'"),
    ],
)
def test_damaged_metadata_is_named_with_the_file(saved, tmp_path, change, message):
    path, _, _ = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        data = json.loads(f.metadata()[ckpt.METADATA_KEY])
    changed = change(data)
    bad = tmp_path / "bad.safetensors"
    text = changed if isinstance(changed, str) else json.dumps(changed)
    save_file(tensors, str(bad), metadata={ckpt.METADATA_KEY: text, "format": "pt"})
    with pytest.raises(ValueError, match=rf"^'{bad}': .*{message}"):
        ckpt.load_checkpoint(bad)


def test_wrong_shaped_tensors_are_named_and_change_nothing(saved, tmp_path, decoder_loader):
    path, head, _ = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith("connector.") and tensors[k].ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"shape.safetensors' does not match its own config: 1 of the wrong shape"):
        ckpt.load_checkpoint(tmp_path / "shape.safetensors")
    decoder = decoder_loader("sana")
    before = {k: v.clone() for k, v in decoder.denoiser.state_dict().items()}
    state = dict(before)
    first, last = next(iter(state)), list(state)[-1]
    state[first] = torch.ones_like(state[first])  # would change the denoiser if anything were copied
    state[last] = torch.zeros(*state[last].shape, 2)
    with pytest.raises(ValueError, match=rf"do not fit this sana denoiser: 1 of the wrong shape \['{last}"):
        ckpt.apply_decoder_state(decoder, state)
    after = decoder.denoiser.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
