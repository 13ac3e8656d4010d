"""Sample grids written during training: fixed prompts (pretrain) or fixed data samples (instruct)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from metaqueries_core.images import tensor_to_pil
from metaqueries_core.sampling import Guidance, generate

from .config import RunConfig
from .data.samples import InstructSample


def grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Images of one size laid out row by row on a grey canvas."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (64, 64, 64))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im.resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


@torch.no_grad()
def write_sample_grid(path: Path, mllm, head, decoder, cfg: RunConfig, data, n: int = 4) -> Path:
    from .datasets import sample_size

    height, width = sample_size(cfg)
    guidance = Guidance(scale=cfg.train.guidance, image_scale=cfg.train.image_guidance)
    kw = dict(height=height, width=width, steps=cfg.train.sample_steps, guidance=guidance, seed=cfg.train.seed)
    was_training = head.training
    head.eval()
    try:
        if cfg.train.stage == "pretrain":
            prompts = cfg.train.sample_prompts
            images = tensor_to_pil(generate(mllm, head, decoder, prompts, **kw))
            rows = [images]
        else:
            it = data.iter_from(0, 0)
            samples: list[InstructSample] = [next(it) for _ in range(n)]
            sources = [s.source_images for s in samples]
            out = tensor_to_pil(generate(mllm, head, decoder, [s.instruction for s in samples], images=sources, **kw))
            rows = [[*s.source_images, s.target, o] for s, o in zip(samples, out)]
    finally:
        head.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(path)
    return path
