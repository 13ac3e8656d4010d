"""Sampling: classifier-free guidance (text, and three-branch image guidance for editing) with any diffusers
scheduler, seeded, with a per-step callback. Kept apart from the models: the loop only calls `decoder.predict`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .head import MetaQueryHead
from .mllm import MLLMAdapter

# (step index, total steps, latents after the step (B, c, h, w), the clean latents x0 the step's guided prediction
# implies (B, c, h, w): what previews show, since early latents are mostly noise)
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Guidance:
    scale: float = 4.5  # text guidance s (reference range 3.0-7.5)
    image_scale: float = 1.5  # image guidance s_img (used only with input images)

    def branches(self, has_images: bool) -> int:
        """Number of conditioning branches: 1 (no CFG), 2 (text CFG) or 3 (image + text CFG)."""
        if has_images and self.image_scale != 1.0:
            return 3
        return 2 if self.scale != 1.0 else 1


def combine(outputs: Sequence[torch.Tensor], guidance: Guidance) -> torch.Tensor:
    """Merge branch predictions ordered [uncond, (image-only), cond].

    2 branches: u + s (c - u). 3 branches: u + s_img (u_img - u) + s (c - u_img), ComfyUI's DualCFGGuider formula.
    """
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2:
        u, c = outputs
        return u + guidance.scale * (c - u)
    if len(outputs) == 3:
        u, u_img, c = outputs
        return u + guidance.image_scale * (u_img - u) + guidance.scale * (c - u_img)
    raise ValueError(f"expected 1, 2 or 3 guidance branches, got {len(outputs)}")


def branch_prompts(
    prompts: list[str],
    negative: str,
    images: list[list[Image.Image]] | None,
    n_branches: int,
) -> tuple[list[str], list[list[Image.Image]] | None]:
    """Prompts and image lists of all branches, concatenated in branch order so one MLLM forward encodes them all.

    Branches: [negative + black images], [negative + images], [caption + images] (with images, 3 branches);
    [negative (+ images)], [caption (+ images)] (2 branches); [caption (+ images)] (1 branch).
    """
    b = len(prompts)
    if n_branches == 1:
        return list(prompts), images
    if n_branches == 2:
        return [negative] * b + list(prompts), None if images is None else list(images) + list(images)
    if images is None:
        raise ValueError("three-branch image guidance needs input images")
    black = [[Image.new("RGB", im.size, (0, 0, 0)) for im in sample] for sample in images]
    return [negative] * (2 * b) + list(prompts), black + list(images) + list(images)


def encode_branches(
    mllm: MLLMAdapter,
    head: MetaQueryHead,
    prompts: list[str],
    *,
    negative: str = "",
    images: list[list[Image.Image]] | None = None,
    guidance: Guidance = Guidance(),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (cond (K*B, N, C), mask (K*B, N), K) with K the number of branches, all in one batched MLLM forward."""
    has_images = images is not None and any(images)
    k = guidance.branches(has_images)
    all_prompts, all_images = branch_prompts(prompts, negative, images if has_images else None, k)
    with torch.no_grad():
        cond, mask = head.encode(mllm, all_prompts, all_images)
    return cond, mask, k


@torch.no_grad()
def denoise(
    decoder,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    branches: int,
    height: int,
    width: int,
    steps: int = 30,
    guidance: Guidance = Guidance(),
    scheduler: str = "dpmpp_2m",
    seed: int = 0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from seeded noise: cond (K*B, T, C) in branch order -> latents (B, c, h, w) on the decoder's device
    (the conditioning is moved there: the MLLM and head may sit elsewhere)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if cond.shape[0] % branches:
        raise ValueError(f"conditioning batch {cond.shape[0]} is not a multiple of {branches} branches")
    b = cond.shape[0] // branches
    shape = decoder.latent_shape(b, height, width)  # (B, c, h, w)
    sched = decoder.make_scheduler(scheduler)
    # SD1.5's "leading" spacing with steps_offset 1 would step past its last training timestep
    most = sched.config.num_train_timesteps - sched.config.get("steps_offset", 0)
    if steps > most:
        raise ValueError(
            f"steps must be 1..{most} for this {decoder.family} decoder's {scheduler} scheduler "
            f"({sched.config.num_train_timesteps} training timesteps), got {steps}"
        )
    sched.set_timesteps(steps, device=decoder.device)
    generator = torch.Generator("cpu").manual_seed(seed)
    dtype = next(decoder.denoiser.parameters()).dtype
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(decoder.device)
    latents = latents * sched.init_noise_sigma  # (B, c, h, w)
    cond = cond.to(decoder.device, dtype)
    mask = None if mask is None else mask.to(decoder.device)
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(torch.cat([latents] * branches), t)  # (K*B, c, h, w)
        out = decoder.predict(x.to(dtype), t.expand(x.shape[0]), cond, mask).float()  # (K*B, c, h, w)
        out = combine(out.chunk(branches), guidance)  # (B, c, h, w)
        latents = sched.step(out, t, latents, return_dict=False)[0]
        if callback is not None:
            denoised = decoder.denoised(x[: out.shape[0]], out, t)  # (B, c, h, w); every branch's x is the same
            callback(i, len(sched.timesteps), latents, denoised)
    return latents


def generate(
    mllm: MLLMAdapter,
    head: MetaQueryHead,
    decoder,
    prompts: list[str],
    *,
    negative: str = "",
    images: list[list[Image.Image]] | None = None,
    height: int = 512,
    width: int = 512,
    steps: int = 30,
    guidance: Guidance = Guidance(),
    scheduler: str = "dpmpp_2m",
    seed: int = 0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Prompts (+ input images) -> images (B, 3, H, W) in [0, 1]: encode all branches, denoise, decode."""
    cond, mask, k = encode_branches(mllm, head, prompts, negative=negative, images=images, guidance=guidance)
    latents = denoise(
        decoder,
        cond,
        mask,
        branches=k,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        seed=seed,
        callback=callback,
    )
    with torch.no_grad():
        return decoder.decode(latents.to(next(decoder.vae.parameters()).dtype))
