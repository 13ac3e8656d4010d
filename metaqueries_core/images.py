"""Image conversions shared by the MLLM adapters, the decoders and the nodes."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image. Transparent pixels are composited on black, the colour the method uses for a
    dropped (absent) image, so an alpha channel never invents content."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def ensure_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Upscale (nearest neighbour, aspect kept) an image whose shorter side is below what the vision tower accepts."""
    w, h = image.size
    if min(w, h) >= min_side:
        return image
    scale = min_side / min(w, h)
    new_size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    log.warning(
        "image of %dx%d is smaller than the vision tower's minimum side %d; upscaled to %dx%d",
        w,
        h,
        min_side,
        *new_size,
    )
    return image.resize(new_size, Image.NEAREST)


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float in [0, 1]."""
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]  # each (H, W, 3)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [0, 1] -> PIL images."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
