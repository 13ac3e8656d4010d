"""MLLM adapters on tiny models loaded from disk: prompt layout, read-out, frozen weights, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from mq_testutil import MLLM_FAMILIES, VISION_FAMILIES
from PIL import Image

from metaqueries_core.mllm import MLLM_ADAPTERS, load_mllm
from metaqueries_core.tinykit import TinySize, write_tiny_mllm

N = 6


def red(size=(32, 32)):
    return Image.new("RGB", size, (255, 0, 0))


def images_for(family):
    if family not in VISION_FAMILIES:
        return None
    return [[red()], [], [red((40, 24)), Image.new("RGB", (32, 32), (0, 0, 255))]]


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_prepare_left_pads_and_appends_query_slots(mllm_loader, family):
    mllm = mllm_loader(family)
    batch = mllm.prepare(["a red circle", "", "two blue squares on the right"], images_for(family), num_queries=N)
    b, length = batch.input_ids.shape
    assert b == 3 and batch.prompt_embeds.shape == (3, length, mllm.width)
    # queries are the last N positions of every row and always attended
    assert batch.attention_mask[:, -N:].all()
    assert (batch.prompt_embeds[:, -N:] == 0).all()
    # left padding: each row's mask is 0...0 1...1
    for row in batch.attention_mask:
        first = int(row.argmax())
        assert row[:first].sum() == 0 and row[first:].all()
    assert batch.attention_mask[1].sum() < batch.attention_mask[2].sum()  # the empty prompt is shorter


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_query_states_shape_and_prefix_cache_equivalence(mllm_loader, family):
    mllm = mllm_loader(family)
    batch = mllm.prepare(
        ["a red circle", "", "a green triangle above a yellow circle"], images_for(family), num_queries=N
    )
    q = torch.randn(N, mllm.width, requires_grad=True)
    full = mllm.query_states(batch, q)
    (g_full,) = torch.autograd.grad(full.square().sum(), q)
    cached = mllm.query_states(batch, q, prefix_cache=True)
    (g_cached,) = torch.autograd.grad(cached.square().sum(), q)
    assert full.shape == (3, N, mllm.width)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_cached, g_full, atol=1e-5, rtol=1e-5)


def saved_bytes_and_grad(mllm, batch, q, prefix_cache: bool):
    """Bytes autograd keeps for the backward of the query pass, and the queries' gradient."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        states = mllm.query_states(batch, q, prefix_cache=prefix_cache)
    (grad,) = torch.autograd.grad(states.square().sum(), q)
    return sum(saved), states.detach(), grad


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_checkpointed_layers_keep_less_and_give_the_same_gradient(mllm_loader, monkeypatch, family, prefix_cache):
    mllm = mllm_loader(family)
    batch = mllm.prepare(
        ["a red circle", "", "a green triangle above a yellow circle"], images_for(family), num_queries=N
    )
    q = torch.randn(N, mllm.width, requires_grad=True)
    kept, states, grad = saved_bytes_and_grad(mllm, batch, q, prefix_cache)
    monkeypatch.setattr(mllm, "gradient_checkpointing", True)
    kept_ckpt, states_ckpt, grad_ckpt = saved_bytes_and_grad(mllm, batch, q, prefix_cache)
    assert torch.equal(states_ckpt, states) and torch.equal(grad_ckpt, grad)  # replayed layers read the same cache
    assert kept_ckpt < kept / 2, (kept_ckpt, kept)
    with torch.no_grad():  # nothing to recompute without autograd: the plain forward
        assert torch.equal(mllm.query_states(batch, q, prefix_cache=prefix_cache), states)
    assert all("forward" not in vars(layer) for layer in mllm.language_model.layers)  # the layers are restored


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_readout_depends_on_prompt_and_is_batch_independent(mllm_loader, family):
    mllm = mllm_loader(family)
    q = torch.randn(N, mllm.width)
    with torch.no_grad():
        a = mllm.encode(["a red circle"], None, q)
        b = mllm.encode(["a blue square on the right"], None, q)
        both = mllm.encode(["a red circle", "a blue square on the right"], None, q)
    assert not torch.allclose(a, b)
    # left padding must not change a sample's states
    torch.testing.assert_close(both[0:1], a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1:2], b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_images_are_capped_at_the_reference_trainers_token_count(mllm_folder, tmp_path, family):
    """The released Qwen folders allow 16384 tokens an image; the adapter caps it (1280 by default, as the
    reference trainer does). The tiny processor allows 64 tokens (8-px merged patches, 4096 pixels)."""
    image = [[Image.new("RGB", (256, 256), (200, 30, 30))]]

    def image_tokens(**options) -> int:
        mllm = load_mllm(mllm_folder(family), **options)
        batch = mllm.prepare(["x"], image, num_queries=1)
        return int((batch.input_ids == mllm.image_token_id).sum())

    assert image_tokens() == image_tokens(max_image_tokens=None) == 64  # the folder's limit is below 1280
    assert image_tokens(max_image_tokens=16) == 16
    with pytest.raises(ValueError, match="max_image_tokens must be >= 1"):
        image_tokens(max_image_tokens=0)
    # a folder that allows 16384 tokens, as the released ones do: 1280 by default, all of them with None
    released = shutil.copytree(mllm_folder(family), tmp_path / "released")
    config = json.loads((released / "preprocessor_config.json").read_text())
    config["size"]["longest_edge"] = 16384 * 64
    (released / "preprocessor_config.json").write_text(json.dumps(config))
    image = [[Image.new("RGB", (352, 352), (200, 30, 30))]]
    mllm_folder = {family: released}.get
    assert image_tokens() <= 1280 < image_tokens(max_image_tokens=None) == (352 // 8) ** 2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_small_images_are_scaled_up_to_min_image_tokens(mllm_loader, family):
    """The reference gives Qwen2.5-VL images at least 256 tokens; `min_image_tokens` scales a smaller image up to that
    many. The tiny processor's own range is 4-64 tokens of 8-px merged patches."""
    mllm = mllm_loader(family)

    def image_tokens(side: int, **options) -> int:
        batch = mllm.prepare(["x"], [[Image.new("RGB", (side, side), (200, 30, 30))]], num_queries=1, **options)
        return int((batch.input_ids == mllm.image_token_id).sum())

    assert image_tokens(16) == image_tokens(16, min_image_tokens=None) == 4
    assert image_tokens(16, min_image_tokens=16) == 16  # 16 px scaled to 32 px: 4 x 4 merged patches
    assert image_tokens(48, min_image_tokens=16) == image_tokens(48) == 36  # already larger: as it is
    assert image_tokens(16, min_image_tokens=100) == 100  # a minimum above the folder's 64-token cap wins
    with pytest.raises(ValueError, match="min_image_tokens must be >= 1 or None"):
        image_tokens(16, min_image_tokens=0)


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_fixed_tile_mllms_refuse_min_image_tokens(mllm_loader, family):
    mllm = mllm_loader(family)
    with pytest.raises(ValueError, match=rf"applies to MLLMs that scale images .* \({family}\) gives every image"):
        mllm.prepare(["x"], [[red()]], num_queries=1, min_image_tokens=16)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_images_change_the_states(mllm_loader, family):
    mllm = mllm_loader(family)
    q = torch.randn(N, mllm.width)
    with torch.no_grad():
        plain = mllm.encode(["make it blue"], [[]], q)
        with_red = mllm.encode(["make it blue"], [[red()]], q)
        with_blue = mllm.encode(["make it blue"], [[Image.new("RGB", (32, 32), (0, 0, 255))]], q)
    assert not torch.allclose(plain, with_red)
    assert not torch.allclose(with_red, with_blue)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_mllm_is_frozen_and_unchanged_by_backward(mllm_loader, family):
    mllm = mllm_loader(family)
    assert not mllm.model.training
    assert not any(p.requires_grad for p in mllm.model.parameters())
    before = {k: v.clone() for k, v in mllm.model.state_dict().items()}
    q = torch.randn(N, mllm.width, requires_grad=True)
    mllm.encode(["a red circle"], images_for(family) and [[red()]], q).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is None for p in mllm.model.parameters())
    after = mllm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_special_token_text_in_a_caption_is_read_as_plain_text(mllm_loader, family):
    mllm = mllm_loader(family)
    typed = "put the " + " and the ".join(t for t in (mllm.image_token, "<|im_end|>", "<|im_start|>") if t) + " here"
    images = [[red()]] if family in VISION_FAMILIES else None
    (row,), feats, _ = mllm.tokenize([typed], images)
    (plain,), _, _ = mllm.tokenize(["put the cup here"], images)
    special = set(mllm.tokenizer.all_special_ids) | ({mllm.image_token_id} if mllm.image_token else set())
    # the typed text adds no special token (no image placeholder without an image, no turn marker)
    assert sorted(i for i in row if i in special) == sorted(i for i in plain if i in special)
    assert typed in mllm.tokenizer.decode(row)  # and it is all there, as text
    if images:
        assert sum(i == mllm.image_token_id for i in row) == feats[0].shape[0]  # one image, its features' tokens
    q = torch.randn(N, mllm.width)
    with torch.no_grad():
        assert mllm.encode([typed, "x"], None if images is None else [[], [red()]], q).isfinite().all()


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_plain_captions_tokenise_as_the_whole_rendered_prompt(mllm_loader, family):
    """The caption is tokenised on its own (so it stays plain text); for ordinary captions that must give exactly
    the ids of tokenising the whole rendered prompt, as the reference trainer and OpenUni do."""
    mllm = mllm_loader(family)
    captions = ["a red circle on the left", "Make the square blue!", "two  cats, 3 dogs; é ü 猫", " leading space", ""]
    rows, _, _ = mllm.tokenize(captions)
    for caption, row in zip(captions, rows):
        text = mllm.render(caption, 0, mllm.system_prompt)
        assert row == mllm.tokenizer(text, add_special_tokens=False)["input_ids"], caption


def test_long_caption_is_truncated_with_warning(mllm_loader, caplog):
    mllm = mllm_loader("qwen2")
    long = "a red circle on the left " * 100
    with caplog.at_level(logging.WARNING):
        batch = mllm.prepare([long], None, num_queries=N, max_prompt_tokens=16)
    assert "truncated to 16" in caplog.text
    short = mllm.prepare(["a red circle on the left " * 3], None, num_queries=N, max_prompt_tokens=16)
    assert batch.input_ids.shape[1] <= short.input_ids.shape[1] + 16


def test_system_prompt_goes_into_the_prompt(mllm_loader):
    mllm = mllm_loader("qwen2")
    with_sys = mllm.prepare(["x"], None, num_queries=N, system_prompt="be brief")
    without = mllm.prepare(["x"], None, num_queries=N, system_prompt=None)
    assert "be brief" in mllm.tokenizer.decode(with_sys.input_ids[0])
    assert with_sys.input_ids.shape[1] > without.input_ids.shape[1]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_odd_images_are_converted(mllm_loader, family):
    mllm = mllm_loader(family)
    q = torch.randn(N, mllm.width)
    odd = [
        [Image.new("RGB", (1, 1), (255, 0, 0))],
        [Image.new("RGBA", (32, 32), (255, 0, 0, 128))],
        [Image.new("L", (32, 20), 128)],
        [Image.new("RGB", (1000, 2), (0, 0, 255))],  # a strip: side ratio 500 (Qwen-VL's processor refuses > 200)
        [Image.new("RGB", (3, 900), (0, 255, 0))],
    ]
    with torch.no_grad():
        out = mllm.encode(["a", "b", "c", "d", "e"], odd, q)
    assert out.shape == (5, N, mllm.width) and torch.isfinite(out).all()


def test_strip_images_are_padded_not_cropped_to_the_ratio_qwen_vl_accepts(caplog):
    from metaqueries_core.images import ensure_max_aspect

    strip = Image.new("RGB", (1000, 8), (255, 0, 0))
    assert ensure_max_aspect(strip, 200.0) is strip  # 1000 / 8 = 125 <= 200: unchanged
    tall = Image.new("RGB", (2, 1000), (255, 0, 0))
    padded = ensure_max_aspect(tall, 200.0)
    assert padded.size == (5, 1000) and "padded to 5x1000" in caplog.text
    pixels = np.asarray(padded)  # (H, W, 3): the strip centred, black either side, nothing scaled
    assert (pixels[:, 1:3] == (255, 0, 0)).all() and (pixels[:, [0, 3, 4]] == 0).all()
    assert ensure_max_aspect(tall, None) is tall


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_too_many_images_is_a_named_error(mllm_loader, family):
    mllm = mllm_loader(family)
    with pytest.raises(ValueError, match=r"sample 0 has 9 images.*at most 8"):
        mllm.prepare(["x"], [[red()] * 9], num_queries=N)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_text_only_model_rejects_images(mllm_loader, family):
    with pytest.raises(ValueError, match=rf"\({family}\) is text-only and takes no images; give it none"):
        mllm_loader(family).prepare(["x", "y"], [[], [red()]], num_queries=N)


def test_understanding_questions_are_not_cut_to_the_caption_limit(mllm_loader, caplog):
    mllm = mllm_loader("qwen2")
    question = "word " * 400 + "what colour is the circle?"
    with caplog.at_level(logging.WARNING):
        mllm.generate_text([question], max_new_tokens=1, max_prompt_tokens=mllm.context_tokens)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        mllm.generate_text([question], max_new_tokens=1)  # the caption format's limit still applies by default
    assert "truncated to 256" in caplog.text


def test_image_lists_must_match_prompts(mllm_loader):
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        mllm_loader("qwen2_5_vl").prepare(["x"], [[red()], []], num_queries=N)


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported MLLM model_type 'gpt2'") as e:
        load_mllm(tmp_path)
    for name in MLLM_ADAPTERS:
        assert name in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ValueError, match="InternVL's remote-code layout; load its transformers-native '-hf' folder"):
        load_mllm(tmp_path)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_mllm(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mllm(tmp_path / "nope")


def test_image_processor_needing_torchvision_names_the_transformers_upgrade(mllm_folder, monkeypatch):
    """transformers 5.5-5.17 raise "AutoImageProcessor requires the Torchvision library" (seen with 5.17 on CPU)."""
    import metaqueries_core.mllm.base as base

    def old_transformers(path):
        raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(base.AutoImageProcessor, "from_pretrained", old_transformers)
    with pytest.raises(ImportError, match=r"Torchvision library[\s\S]*pip install -U 'transformers>=5.18,<6'"):
        load_mllm(mllm_folder("qwen2_5_vl"))


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_understanding_generate_runs(mllm_loader, family):
    out = mllm_loader(family).generate_text(["what colour is it?"], [[red()]], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.parametrize(
    ("family", "size", "says"),
    [
        ("qwen2_5_vl", TinySize(width=80, heads=4), "multiple of 64"),  # head 20: no whole mrope sections
        ("qwen2_vl", TinySize(width=96, heads=4), "multiple of 16"),  # head 24: even, but not mrope's multiple of 16
        ("qwen2", TinySize(width=60, heads=4, kv_heads=3), "key/value groups"),
        ("qwen3", TinySize(width=60, heads=4, kv_heads=2), "even for rotary"),  # head 15
        ("llava", TinySize(), "available"),
    ],
)
def test_tiny_sizes_the_classes_cannot_take_are_refused_before_building(tmp_path, family, size, says):
    with pytest.raises(ValueError, match=says):
        write_tiny_mllm(family, tmp_path / "m", size=size)
    assert not (tmp_path / "m").exists()


def test_text_family_takes_a_head_size_mrope_would_refuse(tmp_path):
    folder = write_tiny_mllm("qwen2", tmp_path / "m", size=TinySize(width=96, heads=4), texts=["a red circle"])
    assert load_mllm(folder).width == 96


def test_internvl_tokens_pixels_and_states_match_the_upstream_processor_and_forward(mllm_loader, monkeypatch):
    """<img> + one <IMG_CONTEXT> per feature + </img> per image, tiles in image order: what transformers' own
    InternVLProcessor makes of the same chat text and images; and the merged embeddings give the HF model's states."""
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    # its class check looks up a video processor class, which fails without torchvision; no video is used here
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None, raising=False)
    mllm = mllm_loader("internvl")
    seq = mllm.model.config.image_seq_length
    upstream = InternVLProcessor(image_processor=mllm.image_processor, tokenizer=mllm.tokenizer, image_seq_length=seq)
    prompts, images = ["a red circle", "", "two blue squares"], images_for("internvl")
    batch = mllm.prepare(prompts, images)
    texts = [mllm.render(p, len(ims), mllm.system_prompt) for p, ims in zip(prompts, images)]
    theirs = upstream(text=texts, images=[im for s in images for im in s], return_tensors="pt", padding=True)
    assert torch.equal(theirs["input_ids"], batch.input_ids)
    assert torch.equal(theirs["attention_mask"], batch.attention_mask)
    assert torch.equal(theirs["pixel_values"], batch.model_inputs["pixel_values"])
    with torch.no_grad():
        hf = mllm.model.model(**theirs, position_ids=batch.position_ids).last_hidden_state  # (B, L, D)
        ours = mllm.language_model(
            inputs_embeds=batch.prompt_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state
    torch.testing.assert_close(ours, hf)


def test_internvl_tiles_follow_the_folders_image_processor(tmp_path):
    folder = write_tiny_mllm("internvl", tmp_path / "m")
    seq = json.loads((folder / "config.json").read_text())["image_seq_length"]  # tokens per tile

    def features(image):
        _, feats, extra = load_mllm(folder).tokenize(["x"], [[image]])
        return feats[0].shape[0], extra["pixel_values"].shape[0]

    # up to 4 tiles: a square image gets 2x2 tiles and a thumbnail, a 4:1 strip 4x1 tiles and a thumbnail
    assert features(red((32, 32))) == (5 * seq, 5)
    assert features(red((64, 16))) == (5 * seq, 5)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "max_patches": 1}))
    assert features(red((64, 16))) == (seq, 1)


def test_internvl_tokenizer_without_image_tokens_is_refused(mllm_loader):
    from metaqueries_core.mllm.internvl import InternVLAdapter

    mllm = mllm_loader("internvl")
    with pytest.raises(ValueError, match=r"lacks the image tokens \['<IMG_CONTEXT>', '<img>', '</img>'\]"):
        InternVLAdapter(
            model=mllm.model, tokenizer=mllm_loader("qwen2").tokenizer, image_processor=mllm.image_processor
        )
