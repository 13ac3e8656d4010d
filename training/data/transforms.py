"""Resizing to the training resolution and aspect-ratio buckets.

Square centre crops throw away the sides of every landscape photo (and the prompt often describes what was cut).
Buckets instead keep a handful of target sizes of (roughly) equal pixel area but different aspect ratios; each image
goes to the bucket whose aspect ratio is closest to its own, so little is cropped, and since all buckets cost about the
same compute, batches stay balanced. Batches are formed from one bucket only (see ``Batches(by_bucket=True)``),
because a batch tensor needs one shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["make_buckets", "nearest_bucket", "resize_and_crop", "target_size", "validate_buckets"]

# Buckets are "of equal area" up to rounding to a multiple of the latent patch size; beyond this relative spread the
# list is probably a mistake (e.g. a 256px bucket mixed into a 1024px list) and would unbalance compute per batch.
BUCKET_AREA_TOLERANCE = 0.25


def target_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``(w, h)`` stays; anything non-positive is an error naming the value."""
    if isinstance(resolution, int):
        width = height = resolution
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        width, height = resolution
    else:
        raise ValueError(f"resolution must be a positive int or (width, height), got {resolution!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution must be a positive int or (width, height), got {resolution!r}")
    return int(width), int(height)


def resize_and_crop(
    image: Image.Image,
    resolution: int | tuple[int, int],
    random_crop: bool = False,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Scale ``image`` so it covers ``resolution`` (an int for a square, or ``(width, height)``), then crop to it.

    The scale is the smallest one that covers both sides (for a square target that is "shorter side = resolution"),
    so nothing is padded. The crop is centred unless ``random_crop``, which draws the offset from ``rng`` (needed,
    so that the crop is reproducible per seed/epoch/sample).
    """
    width, height = target_size(resolution)
    src_w, src_h = image.size
    if (src_w, src_h) == (width, height):
        return image
    scale = max(width / src_w, height / src_h)
    new_w = max(width, round(src_w * scale))
    new_h = max(height, round(src_h * scale))
    # LANCZOS anti-aliases when shrinking (most web images are larger than the target); BICUBIC is enough upwards.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    resized = image.resize((new_w, new_h), resample=resample)
    if random_crop:
        if rng is None:
            raise ValueError("random_crop=True needs an rng (numpy Generator) so the crop is reproducible")
        left = int(rng.integers(0, new_w - width + 1))
        top = int(rng.integers(0, new_h - height + 1))
    else:
        left = (new_w - width) // 2
        top = (new_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def make_buckets(
    resolution: int,
    aspect_ratios: Sequence[float] = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0),
    multiple: int = 64,
) -> list[tuple[int, int]]:
    """Equal-area ``(width, height)`` buckets with area ``resolution**2``, each side a multiple of ``multiple``.

    ``multiple`` should be the VAE downsampling factor times the transformer patch size, so every bucket maps to a
    whole number of latent tokens. Aspect ratio is width / height. Duplicates after rounding are dropped.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got {resolution} and {multiple}")
    buckets: list[tuple[int, int]] = []
    area = resolution * resolution
    for ratio in aspect_ratios:
        if ratio <= 0:
            raise ValueError(f"aspect ratios must be positive (width / height), got {ratio}")
        width = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
        height = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
        if (width, height) not in buckets:
            buckets.append((width, height))
    return buckets


def validate_buckets(buckets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Check a bucket list: non-empty, positive ``(width, height)`` pairs, areas within ``BUCKET_AREA_TOLERANCE``."""
    out: list[tuple[int, int]] = []
    for bucket in buckets:
        if len(bucket) != 2 or int(bucket[0]) <= 0 or int(bucket[1]) <= 0:
            raise ValueError(f"each bucket must be a (width, height) pair of positive ints, got {bucket!r}")
        out.append((int(bucket[0]), int(bucket[1])))
    if not out:
        raise ValueError("the bucket list is empty; give at least one (width, height) or use make_buckets()")
    areas = [w * h for w, h in out]
    if max(areas) > min(areas) * (1 + BUCKET_AREA_TOLERANCE):
        raise ValueError(
            f"buckets must have about equal area (within {BUCKET_AREA_TOLERANCE:.0%}); got areas from {min(areas)} "
            f"to {max(areas)} in {out}"
        )
    return out


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to that of ``size`` = (width, height), compared in log space.

    Log space makes 1:2 and 2:1 equally far from 1:1, so portrait and landscape images are treated alike.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket")
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))
