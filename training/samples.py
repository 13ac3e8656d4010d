"""Sample grids written during training: fixed prompts (pretrain) or fixed data samples (instruct)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from PIL import Image

from metaqueries_core.images import tensor_to_pil
from metaqueries_core.sampling import Guidance, generate

from .config import RunConfig
from .data import SampleDataset
from .data.samples import InstructSample, NoUsableSampleError

BACKGROUND = (64, 64, 64)  # the grey between cells and around letterboxed images


def letterbox(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` scaled to fit ``size`` (width, height) with its aspect ratio kept, centred on the grey background."""
    width, height = size
    scale = min(width / image.width, height / image.height)
    fitted = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    cell = Image.new("RGB", size, BACKGROUND)
    cell.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return cell


def grid(rows: list[list[Image.Image]], pad: int = 2, cell: tuple[int, int] | None = None) -> Image.Image:
    """Images laid out row by row on a grey canvas, each letterboxed into a ``cell`` (width, height); the default
    cell is the largest width by the largest height among the images, so images of one size are pasted as they are."""
    images = [im for row in rows for im in row]
    if not images:
        raise ValueError("a sample grid needs at least one image; got no rows or only empty ones")
    w, h = cell or (max(im.width for im in images), max(im.height for im in images))
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), BACKGROUND)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(letterbox(im, (w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


def grid_samples(data: SampleDataset, n: int) -> list[InstructSample]:
    """The first ``n`` usable samples of epoch 0, or all of them when the dataset has fewer (at least one)."""
    try:
        samples = list(itertools.islice(data.iter_from(0, 0), n))
    except NoUsableSampleError as e:
        raise NoUsableSampleError(f"the instruct sample grid needs at least one usable sample: {e}") from e
    return samples  # never empty: an epoch without a usable sample raises NoUsableSampleError


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
            samples = grid_samples(data, n)
            sources = [s.source_images for s in samples]
            out = tensor_to_pil(generate(mllm, head, decoder, [s.instruction for s in samples], images=sources, **kw))
            rows = [[*s.source_images, s.target, o] for s, o in zip(samples, out)]
    finally:
        head.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, cell=(width, height)).save(path)
    return path
