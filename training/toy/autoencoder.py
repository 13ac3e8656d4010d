"""Toy-job stage: train a tiny DC-AE (diffusers ``AutoencoderDC``, Sana's autoencoder class) on the toy world's images.

Real Sana denoises DC-AE latents; here the decoder does the same on a 4x smaller grid, so the transformer sees 64
tokens instead of the 256 of pixel space at patch 2 and a training step costs about a third (benchmarks/TOYWORLD.md).
The autoencoder is trained once, on train-split images only, with an L1 + L2 reconstruction loss, then frozen; its
``scaling_factor`` is set so the scaled latents have unit standard deviation, as the Sana adapter expects.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderDC
from tqdm.auto import tqdm

from metaqueries_core.images import pil_to_tensor
from metaqueries_core.toyworld import ToyWorld
from metaqueries_core.toyworld.scorer import score_image

from ..optim import adamw

log = logging.getLogger(__name__)


@dataclass
class AutoencoderConfig:
    channels: tuple[int, ...] = (16, 32, 64)  # one block per entry; downsamples by 2 ** (len - 1)
    latent_channels: int = 8
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs >= 2 positive widths (one per resolution), got {self.channels}")
        if self.latent_channels < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"latent_channels, steps and batch_size must be >= 1, got {self.latent_channels}, {self.steps}, "
                f"{self.batch_size}"
            )


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderDC:
    """A DC-AE of residual blocks only (no attention: at 32x32 convolutions see enough), seeded."""
    n = len(cfg.channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderDC(
            in_channels=3,
            latent_channels=cfg.latent_channels,
            attention_head_dim=8,
            encoder_block_types=("ResBlock",) * n,
            decoder_block_types=("ResBlock",) * n,
            encoder_block_out_channels=tuple(cfg.channels),
            decoder_block_out_channels=tuple(cfg.channels),
            encoder_layers_per_block=(1,) * n,
            decoder_layers_per_block=(1,) * n,
            encoder_qkv_multiscales=((),) * n,
            decoder_qkv_multiscales=((),) * n,
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=1.0,
        )


def world_images(world: ToyWorld, split: str, start: int, n: int) -> tuple[torch.Tensor, list]:
    samples = world.caption_samples(split, n, start)
    return pil_to_tensor([s.image for s in samples]) * 2 - 1, samples  # (n, 3, H, W) in [-1, 1]


def train_autoencoder(world: ToyWorld, cfg: AutoencoderConfig) -> tuple[AutoencoderDC, list[float]]:
    """Train on fresh train-split caption images every step (one to three objects); returns the frozen model and
    its per-step losses."""
    ae = build_autoencoder(cfg).train()
    opt = adamw(ae.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup over 5% of the steps, then cosine to 0
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / cfg.steps))
    )
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train autoencoder")
    for step in bar:
        x, _ = world_images(world, "train", step * cfg.batch_size, cfg.batch_size)  # (B, 3, H, W)
        y = ae.decode(ae.encode(x).latent).sample  # (B, 3, H, W)
        loss = (y - x).abs().mean() + (y - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    ae.eval().requires_grad_(False)
    with torch.no_grad():  # unit-variance scaled latents, measured on train images the model has not seen yet
        x, _ = world_images(world, "train", cfg.steps * cfg.batch_size, 256)
        ae.register_to_config(scaling_factor=1.0 / ae.encode(x).latent.std().item())
    return ae, losses


@torch.no_grad()
def reconstruction_accuracy(ae: AutoencoderDC, world: ToyWorld, split: str, n: int = 200) -> float:
    """Share of `split` caption images whose reconstruction the scorer still reads as their caption (all attributes):
    the ceiling the latent decoder can reach."""
    x, samples = world_images(world, split, 0, n)
    y = ae.decode(ae.encode(x).latent).sample.clamp(-1, 1)  # (n, 3, H, W)
    pixels = ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # (n, H, W, 3)
    return float(np.mean([score_image(p, s.scene)["all"] for p, s in zip(pixels, samples)]))
