"""Dataset readers: on-disk formats -> one stream of :class:`CaptionSample` (pretrain) / :class:`InstructSample`.

Typical use in a training loop::

    ds = open_dataset("webdataset", "shards/{00000..00099}.tar", "pretrain", seed=0, rank=rank,
                      world_size=world, resolution=512)
    it = ds.iter_from(epoch, saved_position, saved_waiting)   # 0 and () for a fresh epoch
    batches = Batches(it, batch_size, by_bucket=True)
    for batch in batches:
        ...train...
        log(it.skips.as_metrics()); checkpoint(epoch=epoch, position=it.position, waiting=batches.waiting)

Formats: ``webdataset`` (img2dataset tar shards), ``hf`` (local parquet / save_to_disk arrow; needs pyarrow) and
``jsonl`` (image folder + JSONL manifest). See each module for its layout and options.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any, Literal

from .base import Batches, EpochIterator, IndexedDataset, SampleDataset, Stage, check_stage
from .samples import (
    CaptionSample,
    InstructSample,
    NoUsableSampleError,
    Sample,
    SampleSkipped,
    SkipCounter,
    decode_image,
)
from .transforms import make_buckets, nearest_bucket, resize_and_crop, validate_buckets

__all__ = [
    "Batches",
    "CaptionSample",
    "DatasetKind",
    "EpochIterator",
    "IndexedDataset",
    "InstructSample",
    "NoUsableSampleError",
    "Sample",
    "SampleDataset",
    "SampleSkipped",
    "SkipCounter",
    "Stage",
    "decode_image",
    "make_buckets",
    "nearest_bucket",
    "open_dataset",
    "resize_and_crop",
    "validate_buckets",
]

DatasetKind = Literal["webdataset", "hf", "jsonl"]


def _reader_class(kind: str) -> type[SampleDataset]:
    # Imported here so that `hf` (and its pyarrow import) is only loaded for the format that needs it.
    if kind == "webdataset":
        from .webdataset import WebDatasetReader

        return WebDatasetReader
    if kind == "hf":
        from .hf import HFDiskReader

        return HFDiskReader
    if kind == "jsonl":
        from .jsonl import JsonlReader

        return JsonlReader
    raise ValueError(f"unknown dataset kind {kind!r}; allowed: ['webdataset', 'hf', 'jsonl']")


def _keyword_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(param.name)
    return names


def open_dataset(
    kind: DatasetKind, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], stage: Stage, **opts: Any
) -> SampleDataset:
    """Open a dataset of format ``kind`` at ``path`` for ``stage`` ("pretrain" or "instruct").

    ``path`` is a folder or file; webdataset also takes a glob, a brace pattern or a list of those.

    Options for every format: ``seed``, ``shuffle``, ``rank``, ``world_size``, ``resolution`` | ``buckets``,
    ``random_crop``. Per format: webdataset ``caption_key``, ``instruction_key``, ``split_by``, ``split``; hf
    ``layout``, ``split``, ``split_by``, ``prompt_choice``. An unknown option is an error listing the allowed ones
    (not silently ignored).
    """
    check_stage(stage)
    cls = _reader_class(kind)
    allowed = _keyword_options(cls)
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for dataset kind {kind!r}; allowed: {sorted(allowed)}")
    if isinstance(path, (str, os.PathLike)):
        location: str | list[str] = os.fspath(path)
    elif kind == "webdataset":
        location = [os.fspath(p) for p in path]
    else:
        raise TypeError(f"dataset kind {kind!r} takes one path (file or folder), got {type(path).__name__}")
    return cls(location, stage, **opts)
