"""Which files of a dataset folder hold the wanted split.

Hub layouts keep splits side by side (``data/train-00000-of-00004.parquet`` next to ``data/validation-...``, a
``load_dataset`` cache's ``parquet-train.arrow`` next to ``parquet-validation.arrow``, ``cc3m-train-0000.tar`` next to
``cc3m-validation-0000.tar``): reading a whole folder would train on the other splits too.
"""

from __future__ import annotations

import glob
import os
import re

__all__ = ["KNOWN_SPLITS", "split_files"]

# split names a file may carry besides the requested one: a folder holding only these is refused, not read whole
KNOWN_SPLITS = ("train", "validation", "valid", "val", "test", "dev", "eval")


def _split_words(folder: str, file: str) -> set[str]:
    """The folder names between ``folder`` and ``file``, and the words of the file's name (split at - _ .)."""
    *dirs, name = os.path.relpath(file, folder).split(os.sep)
    return set(dirs) | set(re.split(r"[-_.]", name))


def _check_one_snapshot(folder: str, files: list[str]) -> None:
    """A Hugging Face cache repo folder can hold several revisions (``snapshots/<hash>/``): reading them all would
    read each row once per revision."""
    snapshots = set()
    for file in files:
        parts = os.path.relpath(file, folder).split(os.sep)
        snapshots.update(parts[i + 1] for i, part in enumerate(parts[:-2]) if part == "snapshots")
    if len(snapshots) > 1:
        raise ValueError(
            f"{folder!r} holds {len(snapshots)} snapshots of a Hugging Face cache ({sorted(snapshots)}), each a copy "
            f"of the dataset; point the path at one of them, e.g. {os.path.join(folder, 'snapshots', '<hash>')}"
        )


def split_files(folder: str, suffix: str, split: str, *, deep: bool = True) -> list[str]:
    """Files ``*suffix`` at the top of ``folder`` (with ``deep``, else anywhere below it), sorted, keeping those that
    name ``split`` by a folder (``train/x.parquet``) or a word of their name (``train-00000-of-00004.parquet``).

    Files that name no split at all (``00000.tar``, ``data-00000-of-00001.arrow``) are a single-split dataset and all
    used; a folder whose files name only other splits is refused, naming them."""
    files = sorted(glob.glob(os.path.join(glob.escape(folder), f"*{suffix}")))
    if not files and deep:
        files = sorted(glob.glob(os.path.join(glob.escape(folder), "**", f"*{suffix}"), recursive=True))
    _check_one_snapshot(folder, files)
    selected = [f for f in files if split in _split_words(folder, f)]
    if selected or not files:
        return selected
    named = sorted({word for f in files for word in _split_words(folder, f)} & set(KNOWN_SPLITS))
    if named:
        raise ValueError(
            f"no *{suffix} file of split {split!r} in {folder!r}; its files are of the split(s) {named}: choose one "
            "of those with data.split"
        )
    return files
