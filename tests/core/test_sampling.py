"""Sampling for every MLLM x decoder from disk: shapes, determinism, guidance formulas, callbacks, bad sizes."""

from __future__ import annotations

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from mq_testutil import MLLM_FAMILIES, VISION_FAMILIES
from PIL import Image

from metaqueries_core.decoders.sana import SanaAdapter
from metaqueries_core.decoders.sd15 import SD15Adapter
from metaqueries_core.sampling import Guidance, branch_prompts, combine, denoise, encode_branches, generate

DECODERS = ["sana", "sd15"]


def red_image():
    return Image.new("RGB", (32, 32), (255, 0, 0))


@pytest.mark.parametrize("decoder_family", DECODERS)
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_text_to_image_shapes_and_seeds(mllm_loader, decoder_loader, make_head, family, decoder_family):
    mllm, decoder = mllm_loader(family), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    kw = dict(height=32, width=48, steps=2, guidance=Guidance(scale=3.0))
    a = generate(mllm, head, decoder, ["a red circle", "a blue square"], seed=1, **kw)
    b = generate(mllm, head, decoder, ["a red circle", "a blue square"], seed=1, **kw)
    c = generate(mllm, head, decoder, ["a red circle", "a blue square"], seed=2, **kw)
    assert a.shape == (2, 3, 32, 48) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("decoder_family", DECODERS)
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_image_conditioned_three_branch_sampling(mllm_loader, decoder_loader, make_head, family, decoder_family):
    mllm, decoder = mllm_loader(family), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    images = [[red_image()], [red_image(), Image.new("RGB", (24, 40), (0, 0, 255))]]
    kw = dict(images=images, height=48, width=32, steps=2, guidance=Guidance(scale=3.0, image_scale=1.5))
    a = generate(mllm, head, decoder, ["make it blue", "put both together"], seed=3, **kw)
    b = generate(mllm, head, decoder, ["make it blue", "put both together"], seed=3, **kw)
    assert a.shape == (2, 3, 48, 32) and torch.equal(a, b)
    cond, mask, k = encode_branches(mllm, head, ["x", "y"], images=images, guidance=kw["guidance"])
    assert k == 3 and cond.shape == (6, head.num_queries, decoder.text_width) and mask.shape == (6, head.num_queries)


def test_combine_matches_hand_computation():
    u, ui, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 4.0])
    g = Guidance(scale=7.5, image_scale=1.5)
    assert torch.equal(combine([c], g), c)
    # u + s (c - u) = [1 + 7.5 * -2, -2 + 7.5 * 6] = [-14, 43]
    torch.testing.assert_close(combine([u, c], g), torch.tensor([-14.0, 43.0]))
    # u + 1.5 (ui - u) + 7.5 (c - ui) = [1 + 3 - 30, -2 + 3.75 + 26.25] = [-26, 28]
    torch.testing.assert_close(combine([u, ui, c], g), torch.tensor([-26.0, 28.0]))
    with pytest.raises(ValueError, match="1, 2 or 3"):
        combine([u] * 4, g)


def test_branch_layout():
    img = red_image()
    prompts, images = branch_prompts(["cap"], "neg", [[img]], 3)
    assert prompts == ["neg", "neg", "cap"]
    assert images[0][0].getpixel((0, 0)) == (0, 0, 0) and images[0][0].size == img.size  # black, same size
    assert images[1][0] is img and images[2][0] is img
    assert branch_prompts(["a", "b"], "n", None, 2) == (["n", "n", "a", "b"], None)
    assert Guidance(scale=1.0).branches(False) == 1 and Guidance(image_scale=1.0).branches(True) == 2


def test_guidance_is_applied_in_one_batched_forward(mllm_loader, decoder_loader, make_head):
    """The denoiser sees all branches at once, and the result equals combining separate predictions."""
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder)
    g = Guidance(scale=4.0)
    cond, mask, k = encode_branches(mllm, head, ["a red circle"], negative="blurry", guidance=g)
    seen = []
    original = decoder.predict

    def spy(latents, t, c, m):
        seen.append(latents.shape[0])
        return original(latents, t, c, m)

    decoder.predict = spy
    try:
        denoise(decoder, cond, mask, branches=k, height=32, width=32, steps=2, guidance=g, seed=0)
    finally:
        del decoder.predict
    assert seen == [2, 2]


def test_callback_runs_every_step_and_can_interrupt(mllm_loader, decoder_loader, make_head):
    mllm, decoder = mllm_loader("qwen2"), decoder_loader("sd15")
    head = make_head(mllm, decoder)
    steps = []

    class Stop(Exception):
        pass

    def callback(i, total, latents, denoised):
        f = decoder.spatial_factor
        assert latents.shape == denoised.shape == (1, decoder.latent_channels, 32 // f, 32 // f)
        steps.append((i, total))
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        generate(mllm, head, decoder, ["x"], height=32, width=32, steps=4, callback=callback)
    assert steps == [(0, 4), (1, 4)]
    out = generate(mllm, head, decoder, ["x"], height=32, width=32, steps=2)  # the next run works
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("decoder_family", DECODERS)
def test_size_the_latent_grid_cannot_express(mllm_loader, decoder_loader, make_head, decoder_family):
    mllm, decoder = mllm_loader("qwen2"), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    with pytest.raises(ValueError, match="multiple"):
        generate(mllm, head, decoder, ["x"], height=33, width=32, steps=1)


def test_empty_prompt_is_the_unconditional_branch(mllm_loader, decoder_loader, make_head):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder)
    out = generate(mllm, head, decoder, [""], height=32, width=32, steps=1)
    assert out.shape == (1, 3, 32, 32)


def diffusers_pipeline(decoder, scheduler: str, cond, mask, b: int, output_type: str):
    """The same sampling done by diffusers' own pipeline of the family (no text encoder: embeddings given)."""
    from diffusers import SanaPipeline, StableDiffusionPipeline

    common = dict(height=32, width=64, num_inference_steps=4, guidance_scale=4.0, output_type=output_type)
    common.update(generator=torch.Generator("cpu").manual_seed(7))
    sched = decoder.make_scheduler(scheduler)
    if decoder.family == "sana":
        pipe = SanaPipeline(
            tokenizer=None, text_encoder=None, vae=decoder.vae, transformer=decoder.denoiser, scheduler=sched
        )
        embeds = dict(prompt_attention_mask=mask[b:], negative_prompt_attention_mask=mask[:b])
        embeds.update(negative_prompt=None, use_resolution_binning=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=decoder.vae,
            text_encoder=None,
            tokenizer=None,
            unet=decoder.denoiser,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        embeds = {}  # the UNet pipeline passes no attention mask: ours is all ones here
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=cond[b:], negative_prompt_embeds=cond[:b], **embeds, **common).images


@pytest.mark.parametrize(
    "decoder_family,scheduler", [(a.family, s) for a in (SanaAdapter, SD15Adapter) for s in a.scheduler_names]
)
def test_sampling_equals_the_diffusers_pipeline(decoder_loader, monkeypatch, decoder_family, scheduler):
    """Our loop (CFG, schedulers, flow shift, timestep scale, latent scaling, decoding) against SanaPipeline /
    StableDiffusionPipeline given the same embeddings, scheduler and seed: the same latents and images."""
    decoder = decoder_loader(decoder_family)
    if decoder_family == "sana":  # a timestep scale other than 1, which both must apply
        scaled = FrozenDict({**decoder.denoiser.config, "timestep_scale": 0.5})
        monkeypatch.setattr(decoder.denoiser, "_internal_dict", scaled)
    torch.manual_seed(0)
    b = 2
    cond = torch.randn(2 * b, 8, decoder.text_width)  # (2B, N, C): [negative, caption]
    mask = torch.ones(2 * b, 8, dtype=torch.long)
    if decoder_family == "sana":
        mask[:, 6:] = 0  # padded positions, as the pipeline's tokenizer mask would give
    kw = dict(branches=2, height=32, width=64, steps=4, guidance=Guidance(scale=4.0), scheduler=scheduler, seed=7)
    ours = denoise(decoder, cond, mask, **kw)  # (B, c, h, w)
    theirs = diffusers_pipeline(decoder, scheduler, cond, mask, b, "latent")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    images = diffusers_pipeline(decoder, scheduler, cond, mask, b, "pt")  # (B, 3, H, W) in [0, 1]
    torch.testing.assert_close(decoder.decode(ours), images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder_family", DECODERS)
def test_the_last_euler_step_lands_on_the_denoised_estimate(mllm_loader, decoder_loader, make_head, decoder_family):
    """Euler's final step goes to noise level 0, so the latents it returns are the x0 its prediction implied: the
    callback's `denoised` (what previews show) must equal them, for flow (Sana) and epsilon (SD1.5) decoders."""
    mllm, decoder = mllm_loader("qwen2"), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    cond, mask, k = encode_branches(mllm, head, ["a red circle"], guidance=Guidance(scale=3.0))
    seen = []
    final = denoise(
        decoder,
        cond,
        mask,
        branches=k,
        height=32,
        width=32,
        steps=3,
        scheduler="euler",
        callback=lambda i, total, latents, denoised: seen.append(denoised),
    )
    assert len(seen) == 3
    torch.testing.assert_close(seen[-1], final, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(seen[0], final, atol=1e-3)  # earlier estimates differ: the test can fail
