"""An image folder described by a JSONL manifest: the simplest way to train on your own images.

One JSON object per line, image paths relative to the manifest's folder (absolute paths also work)::

    {"image": "cats/001.jpg", "caption": "a cat on a sofa"}                                   # pretrain
    {"source_images": ["a.png", "b.png"], "instruction": "put the hat on the dog", "target": "out.png"}  # instruct

An optional ``"key"`` names the sample (default ``<manifest>:<line number>``). Lines are parsed when their sample is
read, not at open, so one malformed line is a counted skip (``bad_metadata``) rather than a failed run.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from .base import IndexedDataset, Stage
from .samples import (
    BAD_METADATA,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    MISSING_SOURCE,
    CaptionSample,
    InstructSample,
    NoUsableSampleError,
    Sample,
    SampleSkipped,
    load_image_file,
)

__all__ = ["JsonlReader", "find_manifest"]


def find_manifest(path: str) -> str:
    """The manifest file: ``path`` itself, or in a folder ``manifest.jsonl`` or its only ``*.jsonl``."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no JSONL manifest at {path!r} (give a .jsonl file or a folder holding one)")
    default = os.path.join(path, "manifest.jsonl")
    if os.path.isfile(default):
        return default
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.jsonl")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"folder {path!r} must hold manifest.jsonl or exactly one *.jsonl file; found {[os.path.basename(f) for f in found]}"
        )
    return found[0]


class JsonlReader(IndexedDataset):
    """Samples from a JSONL manifest plus image files next to it."""

    def __init__(self, path: str, stage: Stage, **common: Any) -> None:
        manifest = find_manifest(path)
        super().__init__(manifest, stage, **common)
        self.base_dir = os.path.dirname(os.path.abspath(manifest))
        with open(manifest, encoding="utf-8") as f:
            self._lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
        if not self._lines:
            raise NoUsableSampleError(f"no usable sample in {manifest}: the manifest has no non-blank line")

    @property
    def num_rows(self) -> int:
        return len(self._lines)

    def data_files(self) -> list[str]:
        """The manifest and every image path its lines name for this stage (unparsable lines name none: the
        manifest's own size and mtime cover them)."""
        fields = ("image",) if self.stage == "pretrain" else ("source_images", "target")
        paths = [self.path]
        for _, line in self._lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            values = [entry.get(field) for field in fields] if isinstance(entry, dict) else []
            for value in values:
                names = value if isinstance(value, list) else [value]
                paths += [os.path.join(self.base_dir, n) for n in names if isinstance(n, str) and n]
        return paths

    def _row_key(self, row: int) -> str:
        return f"{os.path.basename(self.path)}:{self._lines[row][0]}"

    def _image(self, value: Any, field: str, key: str) -> Any:
        if not isinstance(value, str) or not value:
            raise SampleSkipped(MISSING_IMAGE, f"field {field!r} must be a non-empty path string, got {value!r}")
        return load_image_file(os.path.join(self.base_dir, value), key)

    def _load_row(self, row: int, rng: np.random.Generator) -> Sample:
        key = self._row_key(row)
        try:
            entry = json.loads(self._lines[row][1])
        except json.JSONDecodeError as e:
            raise SampleSkipped(BAD_METADATA, f"line is not JSON: {e}") from e
        if not isinstance(entry, dict):
            raise SampleSkipped(BAD_METADATA, f"line must be a JSON object, got {type(entry).__name__}")
        if isinstance(entry.get("key"), str) and entry["key"]:
            key = entry["key"]
        if self.stage == "pretrain":
            caption = entry.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise SampleSkipped(MISSING_CAPTION, f"'caption' is {caption!r}")
            return CaptionSample(image=self._image(entry.get("image"), "image", key), caption=caption.strip(), key=key)
        instruction = entry.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise SampleSkipped(MISSING_INSTRUCTION, f"'instruction' is {instruction!r}")
        sources = entry.get("source_images")
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list) or not sources:
            raise SampleSkipped(MISSING_SOURCE, f"'source_images' must be a non-empty list of paths, got {sources!r}")
        return InstructSample(
            source_images=[self._image(value, "source_images", key) for value in sources],
            instruction=instruction.strip(),
            target=self._image(entry.get("target"), "target", key),
            key=key,
        )
