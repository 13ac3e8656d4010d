"""Diffusion Sample: CONDITIONING -> images through a MetaQuery decoder (Sana is not in ComfyUI core, SD1.5 also works).

The denoising loop, guidance and schedulers are `metaqueries_core.sampling`; this node only arranges the branches,
reports progress with live previews, honours interrupts and converts the results to IMAGE and LATENT."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metaqueries_core.decoders import SCHEDULER_NAMES, DecoderAdapter
from metaqueries_core.decoders.preview import rgb_projection
from metaqueries_core.sampling import Guidance, denoise

from . import comfy_env
from .common import CATEGORY, DECODER, DECODER_WEIGHTS_KEY, decoded_to_image, from_conditioning, tip


def arrange_branches(
    positive: list, negative: list, image_negative: list | None, guidance: Guidance, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """-> (cond (K*B, T, C), mask (K*B, T) or None, K) in the branch order `denoise` expects.

    Branches: [negative, image_negative, positive] with image guidance; [image_negative, positive] when image guidance
    is 1 (u + 1 (u_img - u) = u_img); [negative, positive] without image conditioning; [positive] when nothing guides.
    Every conditioning holds 1 sample or as many as `positive` (b); each sample is repeated `batch_size` times, so
    B = b * batch_size."""
    named = {"positive": from_conditioning(positive, "positive")}
    if image_negative is not None and guidance.image_scale != 1.0:
        order = ["negative", "image_negative", "positive"]
    elif image_negative is not None:
        order = ["image_negative", "positive"] if guidance.scale != 1.0 else ["positive"]
    else:
        order = ["negative", "positive"] if guidance.scale != 1.0 else ["positive"]
    given = {"negative": negative, "image_negative": image_negative}
    for name in order[:-1]:
        named[name] = from_conditioning(given[name], name)
    b = named["positive"][0].shape[0]
    shapes = {name: tuple(c.shape) for name, (c, _) in named.items()}
    if any(s[0] not in (1, b) for s in shapes.values()):
        raise ValueError(f"conditioning batch sizes disagree: {shapes}; each must be 1 or the positive batch {b}")
    if len({s[1:] for s in shapes.values()}) != 1:
        raise ValueError(f"conditioning shapes disagree beyond the batch: {shapes}; they must come from one checkpoint")
    conds, masks = [], []
    for name in order:
        cond, mask = named[name]
        cond = cond.expand(b, -1, -1).repeat_interleave(batch_size, dim=0)  # (B, T, C)
        mask = torch.ones(cond.shape[:2], dtype=torch.long) if mask is None else mask.expand(b, -1)
        conds.append(cond)
        masks.append(mask.cpu().repeat_interleave(batch_size, dim=0))  # (B, T)
    has_mask = any(named[name][1] is not None for name in order)
    return torch.cat(conds), torch.cat(masks) if has_mask else None, len(order)


def check_decoder_weights(positive: list, decoder: DecoderAdapter) -> None:
    """Refuse a decoder without the fine-tuned weights the conditioning's checkpoint trained it to (the base decoder
    would run silently and draw badly)."""
    needed = positive[0][1].get(DECODER_WEIGHTS_KEY)
    if needed and decoder.weights_from != needed:
        has = f"those of {decoder.weights_from!r}" if decoder.weights_from else "its folder's own weights"
        raise ValueError(
            f"the conditioning comes from checkpoint {needed!r}, which fine-tuned its decoder, but this decoder has "
            f"{has}; connect {needed!r} to Load Diffusion Decoder's checkpoint input"
        )


def decode_each(decoder: DecoderAdapter, latents: torch.Tensor, done: Callable[[int], None]) -> torch.Tensor:
    """Latents (B, c, h, w) -> ComfyUI IMAGE (B, H, W, 3), one image at a time: the VAE's activations are one image's
    (a large batch at a large size would not fit where its denoising did), each finished image leaves the device,
    and the bar and Cancel work between images. `done(k)` is called after the k-th image (1-based)."""
    dtype = next(decoder.vae.parameters()).dtype
    images = []
    for k in range(latents.shape[0]):
        comfy_env.throw_if_interrupted()
        with torch.no_grad():
            images.append(decoded_to_image(decoder.decode(latents[k : k + 1].to(dtype))))  # (1, H, W, 3)
        done(k + 1)
    return torch.cat(images)  # (B, H, W, 3)


class DiffusionSample:
    DESCRIPTION = (
        "Generates images with a MetaQuery decoder (Sana or SD1.5): classifier-free guidance on positive vs negative; "
        "with image_negative (from Edit Conditioning) also image guidance, u + s_img (u_img - u) + s (c - u_img). "
        "All branches run in one batched forward per step."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = (
        "Generated images (B, H, W, 3) in [0, 1].",
        "Final latents in the VAE's latent space (unscaled, ComfyUI's convention).",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        size = dict(default=512, min=8, max=8192, step=8)
        return {
            "required": {
                "decoder": (DECODER, tip("Diffusion decoder from Load Diffusion Decoder.")),
                "positive": ("CONDITIONING", tip("Prompt conditioning (MetaQuery Connector or Edit Conditioning).")),
                "negative": ("CONDITIONING", tip("Unconditional / negative-prompt conditioning.")),
                "width": ("INT", tip("Image width in pixels; a multiple of the decoder's latent grid.", **size)),
                "height": ("INT", tip("Image height in pixels; a multiple of the decoder's latent grid.", **size)),
                "batch_size": ("INT", tip("Images per conditioning sample.", default=1, min=1, max=64)),
                "steps": ("INT", tip("Denoising steps.", default=30, min=1, max=1000)),
                "guidance": (
                    "FLOAT",
                    tip("Text guidance scale s (1 disables text CFG).", default=4.5, min=0.0, max=100.0, step=0.1),
                ),
                "image_guidance": (
                    "FLOAT",
                    tip(
                        "Image guidance scale s_img; used only with image_negative (1 disables it).",
                        default=1.5,
                        min=0.0,
                        max=100.0,
                        step=0.1,
                    ),
                ),
                "seed": (
                    "INT",
                    tip("Noise seed.", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                ),
                "scheduler": (
                    list(SCHEDULER_NAMES),
                    tip("Sampler; Sana (flow matching) takes dpmpp_2m, euler, unipc.", default="dpmpp_2m"),
                ),
            },
            "optional": {
                "image_negative": (
                    "CONDITIONING",
                    tip("Image-only branch from Edit Conditioning; enables image guidance."),
                ),
            },
        }

    def sample(
        self,
        decoder: DecoderAdapter,
        positive: list,
        negative: list,
        width: int,
        height: int,
        batch_size: int,
        steps: int,
        guidance: float,
        image_guidance: float,
        seed: int,
        scheduler: str,
        image_negative: list | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = Guidance(scale=guidance, image_scale=image_guidance)
        cond, mask, branches = arrange_branches(positive, negative, image_negative, g, batch_size)
        check_decoder_weights(positive, decoder)
        if cond.shape[-1] != decoder.text_width:
            raise ValueError(
                f"conditioning width {cond.shape[-1]} does not match the {decoder.family} decoder's text width "
                f"{decoder.text_width}; use a MetaQuery checkpoint trained for this decoder"
            )
        bar = comfy_env.progress_bar(steps + batch_size)  # the denoising steps, then one per decoded image
        to_rgb = rgb_projection(decoder) if comfy_env.previews_enabled() else None
        denoise_steps = steps  # the scheduler's own count, as the callback reports it

        def on_step(i: int, total: int, latents: torch.Tensor, denoised: torch.Tensor) -> None:
            nonlocal denoise_steps
            denoise_steps = total
            comfy_env.throw_if_interrupted()
            preview = None if to_rgb is None else comfy_env.preview_image(to_rgb(denoised[0]))
            bar.update_absolute(i + 1, total + batch_size, preview)

        comfy_env.throw_if_interrupted()
        try:
            latents = denoise(
                decoder,
                cond,
                mask,
                branches=branches,
                height=height,
                width=width,
                steps=steps,
                guidance=g,
                scheduler=scheduler,
                seed=seed,
                callback=on_step,
            )  # (B, c, h, w)
            images = decode_each(
                decoder, latents, lambda k: bar.update_absolute(denoise_steps + k, denoise_steps + batch_size)
            )
        finally:
            comfy_env.soft_empty_cache()
        samples = decoder.to_vae_latents(latents.float())  # ComfyUI's LATENT holds raw VAE latents
        samples = samples.to(comfy_env.intermediate_device())
        return images, {"samples": samples}
