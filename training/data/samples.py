"""Sample types, skip accounting and image decoding shared by every dataset format.

Web-scale image data always has some broken records (truncated JPEGs, empty captions, files that vanished). A training
run must neither crash on them nor hide them: readers raise :class:`SampleSkipped` with a short *reason*, the dataset
counts it in a :class:`SkipCounter` and moves on, and the trainer logs the counts as metrics.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from metaqueries_core.images import to_rgb

__all__ = [
    "CaptionSample",
    "InstructSample",
    "NoUsableSampleError",
    "Sample",
    "SampleSkipped",
    "SkipCounter",
    "decode_image",
    "load_image_file",
]

logger = logging.getLogger(__name__)

# Skip reasons used by the readers (free-form strings are allowed; these are the ones they emit).
DECODE_ERROR = "decode_error"  # image bytes that Pillow cannot decode
MISSING_IMAGE = "missing_image"  # no image in the record, or its file does not exist
MISSING_CAPTION = "missing_caption"  # no caption, or an empty one
MISSING_INSTRUCTION = "missing_instruction"
MISSING_SOURCE = "missing_source"  # an instruct record without any source image
BAD_METADATA = "bad_metadata"  # unparsable JSON / text, or a field of the wrong type
UNREADABLE_SHARD = "unreadable_shard"  # a tar shard that could not be opened or is truncated
UNREADABLE_FILE = "unreadable_file"  # a damaged parquet row group (each of its rows counts once)

# Exceptions Pillow raises on broken files: SyntaxError and struct.error come from its plugin parsers (e.g. a broken
# PNG chunk), zlib.error from corrupt deflate streams, DecompressionBombError from absurd image sizes.
IMAGE_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


@dataclass
class CaptionSample:
    """One text-to-image (pretrain) sample."""

    image: Image.Image
    caption: str
    key: str


@dataclass
class InstructSample:
    """One instruction-guided (edit / subject-driven) sample: source images + instruction -> target image."""

    source_images: list[Image.Image]
    instruction: str
    target: Image.Image
    key: str


Sample = CaptionSample | InstructSample


class SampleSkipped(Exception):
    """Raised by a reader for one unusable record; the dataset counts it under ``reason`` and continues."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NoUsableSampleError(RuntimeError):
    """A dataset (or one rank's share of it) produced no sample at all in a full epoch."""


@dataclass
class SkipCounter:
    """Counts skipped records by reason; the first few of each reason are logged with their key and detail."""

    log_first: int = 5
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, key: str = "", detail: str = "") -> None:
        """Record one skipped record (logs a warning for the first ``log_first`` of each reason)."""
        self.counts[reason] += 1
        if self.counts[reason] <= self.log_first:
            suffix = " (further ones logged at debug level)" if self.counts[reason] == self.log_first else ""
            logger.warning("skipped sample %r: %s %s%s", key, reason, detail, suffix)
        else:
            logger.debug("skipped sample %r: %s %s", key, reason, detail)

    def merge(self, other: SkipCounter) -> None:
        """Add another counter's counts into this one (e.g. per-epoch into per-run)."""
        self.counts.update(other.counts)

    @property
    def total(self) -> int:
        """Number of skipped records over all reasons."""
        return sum(self.counts.values())

    def as_metrics(self, prefix: str = "data/skipped") -> dict[str, int]:
        """Flat ``{prefix/reason: n, prefix/total: n}`` for a metrics logger."""
        out = {f"{prefix}/{reason}": n for reason, n in sorted(self.counts.items())}
        out[f"{prefix}/total"] = self.total
        return out

    def __str__(self) -> str:
        if not self.counts:
            return "0 skipped"
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        return f"{self.total} skipped ({detail})"


def _finish_open(image: Image.Image) -> Image.Image:
    # load() forces the full decode now: Pillow opens lazily, and a truncated JPEG would otherwise fail later, outside
    # the reader's error handling. exif_transpose applies the camera rotation, so captions describe an upright image.
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def decode_image(data: bytes, key: str = "") -> Image.Image:
    """Decode encoded image bytes to an RGB image, raising :class:`SampleSkipped` (``decode_error``) if broken."""
    if not data:
        raise SampleSkipped(MISSING_IMAGE, f"empty image bytes for {key!r}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _finish_open(image)
    except IMAGE_DECODE_ERRORS as e:
        raise SampleSkipped(DECODE_ERROR, f"{type(e).__name__}: {e}") from e


def load_image_file(path: str, key: str = "") -> Image.Image:
    """Open an image file to RGB; a missing file is ``missing_image``, an undecodable one ``decode_error``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise SampleSkipped(MISSING_IMAGE, f"no such file {path!r}") from e
    except OSError as e:
        raise SampleSkipped(MISSING_IMAGE, f"cannot read {path!r}: {e}") from e
    return decode_image(data, key)
