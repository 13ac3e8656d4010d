"""Written files get the permissions the process umask gives a new file (0666 & ~umask: 0644 under umask 022).

safetensors' `save_file` (0.8) creates its files owner-only (0600) whatever the umask, and transformers' and
diffusers' `save_pretrained` and accelerate's `save_state` write through it. A model exported by the training job
would then be unreadable to a ComfyUI server running as another user, in a container or from a shared model store.
Writers call `apply_umask` on a finished file or folder of their own before putting it in place, or write into a
folder that may hold the user's files inside `apply_umask_to_writes`. Folders need nothing: they are created with the
umask's mode already."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["apply_umask", "apply_umask_to_writes", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (`os.umask` can only be read by setting it,
    which is process-wide: a file another thread creates in between would get the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_by_swapping()


@cache
def _umask_by_swapping() -> int:
    """Where /proc does not show it: set and restored once, the first time it is needed."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _files(path: Path) -> Iterator[Path]:
    """`path` when it is a file, else every file below it (links are skipped: what they point at is not ours)."""
    if path.is_symlink():
        return
    if path.is_file():
        yield path
    elif path.is_dir():
        yield from (p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink())


def apply_umask(path: str | Path) -> Path:
    """Give the file `path`, or every file below the folder `path`, the mode a file created under the umask gets.
    Only for what this code has just written: it may loosen a mode. A file system that refuses (some network or
    FAT mounts) is logged, not raised: the written file is complete, only less widely readable."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in _files(path):
        try:
            os.chmod(file, mode)
        except OSError as e:
            log.warning("could not set the permissions of %s to %o: %s", file, mode, e)
    return path


def _identities(folder: Path) -> dict[Path, tuple[int, int]]:
    """Each file below `folder` as (inode, mtime): a replaced file has a new inode, a rewritten one a new mtime."""
    stats = {p: p.stat() for p in _files(folder)}
    return {p: (s.st_ino, s.st_mtime_ns) for p, s in stats.items()}


@contextmanager
def apply_umask_to_writes(folder: str | Path) -> Iterator[Path]:
    """`apply_umask` for the files created or rewritten below `folder` inside the block (`save_pretrained` into a
    folder that may exist already): a file that was there before and was left alone keeps its own mode."""
    folder = Path(folder)
    before = _identities(folder)
    yield folder
    for file, identity in _identities(folder).items():
        if before.get(file) != identity:
            apply_umask(file)
