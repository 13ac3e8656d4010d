"""The nodes on tiny models from disk: shapes, ranges, seeds, and agreement with `metaqueries_core.sampling`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SD15_TINY_CHECKPOINT

from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.tiny import write_tiny_sana
from metaqueries_core.sampling import Guidance, encode_branches, generate
from nodes import Connector, Describe, DiffusionSample, EditConditioning, Encode, comfy_env
from nodes.common import image_to_pil


def conditioning(loaded, prompt, *, checkpoint="checkpoint", image=None):
    (states,) = Encode().encode(loaded["mllm"], loaded[checkpoint], prompt, image)
    return Connector().connect(states)[0]


def sample(decoder, positive, negative, **kw):
    args = dict(width=32, height=32, batch_size=1, steps=2, guidance=4.0, image_guidance=1.5, seed=0)
    args.update(kw)
    return DiffusionSample().sample(decoder, positive, negative, scheduler=args.pop("scheduler", "euler"), **args)


def test_connector_output_is_a_core_conditioning(loaded):
    cond = conditioning(loaded, "a red circle on the left")
    assert isinstance(cond, list) and len(cond) == 1
    tensor, extras = cond[0]
    n, width = loaded["checkpoint"].config.num_queries, loaded["sana"].text_width
    assert tensor.shape == (1, n, width) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
    assert extras == {}  # all-ones mask and no pooled output: nothing for core to misread


@pytest.mark.parametrize("decoder,checkpoint", [("sana", "checkpoint"), ("sd15", SD15_TINY_CHECKPOINT)])
def test_text_to_image(loaded, decoder, checkpoint):
    pos = conditioning(loaded, "a red circle on the left", checkpoint=checkpoint)
    neg = conditioning(loaded, "", checkpoint=checkpoint)
    image, latent = sample(loaded[decoder], pos, neg, width=32, height=48, batch_size=2, seed=3)
    assert image.shape == (2, 48, 32, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    dec = loaded[decoder]
    assert latent["samples"].shape == dec.latent_shape(2, 48, 32)
    again, _ = sample(loaded[decoder], pos, neg, width=32, height=48, batch_size=2, seed=3)
    other, _ = sample(loaded[decoder], pos, neg, width=32, height=48, batch_size=2, seed=4)
    assert torch.equal(image, again) and not torch.equal(image, other)


def test_latent_output_is_in_the_vae_space(loaded):
    """LATENT holds unscaled VAE latents (ComfyUI's convention): re-scaling them and decoding gives the image."""
    dec = loaded["sd15"]
    pos = conditioning(loaded, "x", checkpoint=SD15_TINY_CHECKPOINT)
    image, latent = sample(dec, pos, pos, guidance=1.0)
    scale = dec.vae.config.scaling_factor
    with torch.no_grad():
        redecoded = dec.decode(latent["samples"] * scale).permute(0, 2, 3, 1)
    tol = 1e-5 if dec.dtype == torch.float32 else 1e-2  # bf16 on a GPU: unscaling and rescaling round the latents
    torch.testing.assert_close(redecoded.float().cpu(), image, atol=tol, rtol=tol)  # the node returns it on CPU


def test_text_to_image_matches_the_core_sampler(loaded):
    """Two Encode nodes + Diffusion Sample = core `generate` (which encodes both branches in one batch)."""
    mllm, ckpt, dec = loaded["mllm"], loaded["checkpoint"], loaded["sana"]
    g = Guidance(scale=4.0)
    image, _ = sample(dec, conditioning(loaded, "a red circle"), conditioning(loaded, "blurry"), steps=3, seed=5)
    expected = generate(
        mllm, ckpt.head, dec, ["a red circle"], negative="blurry", height=32, width=32, steps=3, guidance=g,
        scheduler="euler", seed=5,
    )  # fmt: skip
    torch.testing.assert_close(image, expected.permute(0, 2, 3, 1).float().cpu(), atol=1e-4, rtol=1e-4)


def test_edit_conditioning_is_the_three_branch_core_encoding(loaded):
    mllm, ckpt, dec = loaded["mllm"], loaded["checkpoint"], loaded["sana"]
    source, subject = torch.rand(1, 40, 32, 3), torch.rand(1, 24, 24, 3)
    positive, image_negative, negative = EditConditioning().encode(mllm, ckpt, "make it blue", "", source, subject)
    images = [[image_to_pil(source)[0], image_to_pil(subject)[0]]]
    g = Guidance(scale=4.0, image_scale=1.5)
    cond, _, k = encode_branches(mllm, ckpt.head, ["make it blue"], images=images, guidance=g)
    assert k == 3
    for ours, theirs in zip((negative, image_negative, positive), cond.chunk(3)):
        torch.testing.assert_close(ours[0][0], theirs.float().cpu())  # conditioning is handed on on CPU
    out, _ = sample(dec, positive, negative, image_negative=image_negative, steps=3, seed=1)
    expected = generate(
        mllm, ckpt.head, dec, ["make it blue"], images=images, height=32, width=32, steps=3, guidance=g,
        scheduler="euler", seed=1,
    )  # fmt: skip
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).float().cpu(), atol=1e-4, rtol=1e-4)


def test_image_guidance_of_one_needs_no_fully_unconditional_branch(loaded, monkeypatch):
    """s_img = 1: u + (u_img - u) + s (c - u_img) = u_img + s (c - u_img), two branches per step."""
    mllm, ckpt, dec = loaded["mllm"], loaded["checkpoint"], loaded["sana"]
    positive, image_negative, negative = EditConditioning().encode(mllm, ckpt, "x", "", torch.rand(1, 32, 32, 3))
    seen = []
    original = dec.predict
    monkeypatch.setattr(dec, "predict", lambda x, *a: seen.append(x.shape[0]) or original(x, *a))
    three, _ = sample(dec, positive, negative, image_negative=image_negative, image_guidance=1.0)
    two, _ = sample(dec, positive, image_negative)
    assert seen == [2] * 4  # 2 steps each, both with the branches [image_negative, positive]
    torch.testing.assert_close(three, two)


def test_edit_conditioning_batches_images(loaded):
    mllm, ckpt = loaded["mllm"], loaded["checkpoint"]
    outs = EditConditioning().encode(mllm, ckpt, "x", "", torch.rand(2, 32, 32, 3), torch.rand(1, 32, 32, 3))
    assert all(o[0][0].shape[0] == 2 for o in outs)  # image_2 (batch 1) is shared by both samples


def test_image_batch_gives_one_sample_per_image(loaded):
    cond = conditioning(loaded, "a red circle", image=torch.rand(3, 32, 32, 3))
    assert cond[0][0].shape[0] == 3
    neg = conditioning(loaded, "")
    image, _ = sample(loaded["sana"], cond, neg, batch_size=2)
    assert image.shape[0] == 6  # 3 samples x batch_size 2


def test_describe_answers_with_text(loaded):
    images = torch.rand(2, 32, 32, 3)
    plain = copy.copy(loaded["mllm"])
    plain.system_prompt = None  # an empty system_prompt widget: no system message
    (answer,) = Describe().ask(loaded["mllm"], "what colour is it?", "", 4, images)
    expected = plain.generate_text(["what colour is it?"] * 2, [[im] for im in image_to_pil(images)], max_new_tokens=4)
    assert answer == "\n".join(expected)  # one answer per image
    (text_only,) = Describe().ask(loaded["mllm"], "hello", "", 3)
    assert text_only == plain.generate_text(["hello"], max_new_tokens=3)[0]


def recording_bars(monkeypatch) -> list:
    """Every progress bar the nodes make from now on, recording what ComfyUI's bar would show (value, preview)."""
    bars = []

    class Bar(comfy_env._NullProgressBar):
        def __init__(self, total):
            super().__init__(total)
            self.shown, self.previews = [], []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            super().update_absolute(value, total)
            self.shown.append(self.current)
            self.previews.append(preview)

    monkeypatch.setattr(comfy_env, "progress_bar", Bar)
    return bars


def test_sampling_shows_no_previews_unless_comfyui_asks(loaded, monkeypatch):
    bars = recording_bars(monkeypatch)
    pos = conditioning(loaded, "a red circle")
    sample(loaded["sana"], pos, pos, steps=3)
    (bar,) = bars
    assert bar.shown == [1, 2, 3, 4] and bar.previews == [None] * 4  # 3 steps, then the decoded image


def test_sampling_previews_show_the_denoised_image(loaded, monkeypatch, tmp_path):
    """In pixel space the fitted latent-to-RGB map is exact, and Euler's last step lands on its denoised estimate, so
    the last preview is the output image; earlier ones are the estimates on the way there."""
    decoder = load_decoder(write_tiny_sana(tmp_path / "pixel", pixel_space=True, caption_channels=64))
    assert decoder.text_width == loaded["sana"].text_width
    bars = recording_bars(monkeypatch)
    monkeypatch.setattr(comfy_env, "previews_enabled", lambda: True)
    pos, neg = conditioning(loaded, "a red circle"), conditioning(loaded, "")
    image, _ = sample(decoder, pos, neg, width=32, height=48, batch_size=2, steps=3)
    (bar,) = bars
    assert bar.shown == [1, 2, 3, 4, 5] and bar.previews[3:] == [None, None]  # then one step per decoded image
    assert [p[0] for p in bar.previews[:3]] == ["JPEG"] * 3
    shown = [torch.tensor(np.array(p[1]), dtype=torch.float32) for p in bar.previews[:3]]  # (48, 32, 3): sample 0
    assert all(s.shape == (48, 32, 3) for s in shown)
    assert (shown[-1] - image[0] * 255).abs().max() <= 1.0
    assert (shown[0] - image[0] * 255).abs().max() > 10.0


@pytest.mark.parametrize("family", ["sana", "sd15"])
def test_images_decoded_one_at_a_time_equal_the_batch_decoded_at_once(loaded, family):
    from nodes.common import decoded_to_image
    from nodes.sampling import decode_each

    decoder = loaded[family]
    latents = torch.randn(decoder.latent_shape(3, 32, 48), generator=torch.Generator().manual_seed(0))
    done = []
    images = decode_each(decoder, latents, done.append)
    assert done == [1, 2, 3] and images.shape == (3, 32, 48, 3)
    with torch.no_grad():
        torch.testing.assert_close(images, decoded_to_image(decoder.decode(latents)), atol=1e-5, rtol=0)


def test_describe_reports_progress_token_by_token(loaded, monkeypatch):
    bars = recording_bars(monkeypatch)
    Describe().ask(loaded["mllm"], "what colour is it?", "", 5)
    (bar,) = bars
    assert bar.total == 5 and bar.shown[:-1] == list(range(1, len(bar.shown))) and bar.shown[-1] == 5


def test_describe_uses_its_system_prompt_without_changing_the_loaded_mllm(loaded):
    mllm = loaded["mllm"]
    before = mllm.system_prompt
    (answer,) = Describe().ask(mllm, "what colour is it?", "Describe the image or caption.", 4)
    assert mllm.system_prompt == before
    mllm_prompted = copy.copy(mllm)
    mllm_prompted.system_prompt = "Describe the image or caption."
    assert answer == mllm_prompted.generate_text(["what colour is it?"], max_new_tokens=4)[0]


def test_edit_branches_map_onto_core_dual_cfg_guider(loaded, monkeypatch):
    """Diffusion Sample's [negative, image_negative, positive] with (guidance, image_guidance) is core DualCFGGuider
    with cond1 = positive, cond2 = image_negative, cfg_conds = guidance, cfg_cond2_negative = image_guidance
    (style regular): negative + cfg2 (cond2 - negative) + cfg1 (cond1 - cond2)."""
    import nodes.sampling as node_sampling
    from metaqueries_core.sampling import combine

    seen = {}

    def fake_denoise(decoder, cond, mask, *, branches, guidance, height, width, **kw):
        seen.update(cond=cond, branches=branches, guidance=guidance)
        return torch.zeros(decoder.latent_shape(cond.shape[0] // branches, height, width))

    monkeypatch.setattr(node_sampling, "denoise", fake_denoise)
    pos, img, neg = (torch.full((1, 8, 64), v) for v in (3.0, 2.0, 1.0))
    sample(loaded["sana"], [[pos, {}]], [[neg, {}]], image_negative=[[img, {}]], guidance=7.5, image_guidance=1.25)
    assert seen["branches"] == 3
    branches = seen["cond"].chunk(3)  # what the denoiser sees, in branch order
    assert [b.flatten()[0].item() for b in branches] == [1.0, 2.0, 3.0]
    cfg1, cfg2 = 7.5, 1.25
    dual_cfg = neg + cfg2 * (img - neg) + cfg1 * (pos - img)
    torch.testing.assert_close(combine(branches, seen["guidance"]).float().cpu(), dual_cfg)


def test_a_reference_trainer_folder_loads_and_generates(loaded, models_root):
    """Dropped into models/metaqueries/, a reference trainer checkpoint folder loads as the head the importer
    writes, brings its fine-tuned Sana to Load Diffusion Decoder, and generates."""
    from conftest import REFERENCE_NAME, SANA_NAME

    from metaqueries_core.importers.reference import load_reference
    from nodes import LoadCheckpoint, LoadDecoder

    (checkpoint,) = LoadCheckpoint().load(REFERENCE_NAME, "fp32", "cpu")
    config, head, decoder_state = load_reference(models_root / "metaqueries" / REFERENCE_NAME)
    assert checkpoint.config == config and checkpoint.config.lead_slots == 1 and checkpoint.decoder_state
    states = torch.randn(2, config.num_queries, config.mllm_width)
    torch.testing.assert_close(checkpoint.head.connect(states)[0], head.float().connect(states)[0])
    (decoder,) = LoadDecoder().load(SANA_NAME, "fp32", "cpu", checkpoint=checkpoint)
    tuned = {k: v.float() for k, v in decoder_state.items()}
    assert all(torch.equal(decoder.denoiser.state_dict()[k], v) for k, v in tuned.items())
    loaded = {**loaded, "reference": checkpoint}
    pos, neg = (
        conditioning(loaded, "a red circle", checkpoint="reference"),
        conditioning(loaded, "", checkpoint="reference"),
    )
    image, _ = sample(decoder, pos, neg)
    assert image.shape == (1, 32, 32, 3) and image.isfinite().all()
