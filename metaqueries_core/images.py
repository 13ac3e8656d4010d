"""Image conversions shared by the MLLM adapters, the decoders and the nodes."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


# Transparent pixels are composited onto white: web images with alpha are mostly logos, stickers, icons and product
# shots meant to be seen on a white page, and their dark strokes (text, line art) vanish on black. A caption says
# "a black logo", not "a black square", so white matches what the caption writer saw. Training data and images given
# at inference go through the same conversion, so a model sees transparency as it was trained to.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on :data:`ALPHA_BACKGROUND`, 16-bit gray scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency in `info`; going through RGBA keeps it for compositing.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own I -> RGB conversion clips at 255, which turns a 16-bit grayscale PNG almost white.
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
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


def ensure_max_aspect(image: Image.Image, max_aspect: float | None) -> Image.Image:
    """Pad the shorter side with black (centred, nothing cropped or scaled) of an image whose long / short side ratio
    is above what the vision tower's resize rule accepts (Qwen-VL refuses more than 200: a banner or a strip)."""
    w, h = image.size
    if max_aspect is None or max(w, h) <= max_aspect * min(w, h):
        return image
    short = math.ceil(max(w, h) / max_aspect)
    new_size = (w, short) if w > h else (short, h)
    log.warning(
        "image of %dx%d is more elongated than the vision tower accepts (side ratio at most %g); padded to %dx%d",
        w,
        h,
        max_aspect,
        *new_size,
    )
    padded = Image.new("RGB", new_size, (0, 0, 0))
    padded.paste(image, ((new_size[0] - w) // 2, (new_size[1] - h) // 2))
    return padded


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The shorter side scaled to `size` (bilinear, aspect kept, the longer side truncated), then the centred `size` x
    `size` square: torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image, which the reference trainer
    applies to every LLaVA-OneVision input image."""
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    scaled = (size, long) if w <= h else (long, size)
    if scaled != (w, h):
        image = image.resize(scaled, Image.BILINEAR)
    left, top = int(round((scaled[0] - size) / 2.0)), int(round((scaled[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float in [0, 1]."""
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]  # each (H, W, 3)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [0, 1] -> PIL images."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
