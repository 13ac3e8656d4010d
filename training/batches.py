"""From data samples to model inputs: condition dropout (DESIGN.md section 1) and target tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from metaqueries_core.images import pil_to_tensor

from .config import TrainSection
from .data.samples import CaptionSample, InstructSample


@dataclass
class ModelBatch:
    prompts: list[str]
    images: list[list[Image.Image]] | None  # None in pretraining
    targets: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    keys: list[str]


def black_like(images: list[Image.Image]) -> list[Image.Image]:
    return [Image.new("RGB", im.size, (0, 0, 0)) for im in images]


def drop_conditions(
    prompts: list[str], images: list[list[Image.Image]] | None, cfg: TrainSection, rng: np.random.Generator
) -> tuple[list[str], list[list[Image.Image]] | None]:
    """Pretrain: `drop_caption` -> empty caption. Instruct: `drop_caption` -> no instruction, `drop_both` -> no
    instruction and black images, `drop_images` -> black images of the same size. One draw per sample."""
    prompts = list(prompts)
    images = None if images is None else [list(s) for s in images]
    for i in range(len(prompts)):
        r = rng.random()
        if images is None:
            if r < cfg.drop_caption:
                prompts[i] = ""
            continue
        if r < cfg.drop_caption:
            prompts[i] = ""
        elif r < cfg.drop_caption + cfg.drop_both:
            prompts[i] = ""
            images[i] = black_like(images[i])
        elif r < cfg.drop_caption + cfg.drop_both + cfg.drop_images:
            images[i] = black_like(images[i])
    return prompts, images


def to_model_batch(samples: list[CaptionSample | InstructSample]) -> ModelBatch:
    """Samples of one stage -> prompts, source images and a target tensor (all targets must share one size)."""
    sizes = {(s.image if isinstance(s, CaptionSample) else s.target).size for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"a batch needs one target size, got {sorted(sizes)}; set data.resolution or data.buckets")
    if all(isinstance(s, CaptionSample) for s in samples):
        targets = pil_to_tensor([s.image for s in samples])
        return ModelBatch([s.caption for s in samples], None, targets * 2 - 1, [s.key for s in samples])
    if all(isinstance(s, InstructSample) for s in samples):
        targets = pil_to_tensor([s.target for s in samples])
        images = [list(s.source_images) for s in samples]
        return ModelBatch([s.instruction for s in samples], images, targets * 2 - 1, [s.key for s in samples])
    raise TypeError("a batch mixes caption and instruct samples")
