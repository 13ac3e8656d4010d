"""Training-state checkpoints: written to a temporary folder and renamed into place, so a kill during a save
leaves the previous checkpoint intact; the newest complete one is what `--train.resume` continues from.

A checkpoint is complete when its folder has its final name (`step-XXXXXXXX`) and holds the state file, which is
written last. Folders are only ever removed after they stop looking complete (state file first), so a kill in the
middle of a removal cannot leave a half-deleted folder that still passes for a checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from metaqueries_core.file_modes import apply_umask

STATE_FILE = "trainer_state.json"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
NAME = re.compile(rf"{PREFIX}(\d{{8,}})")  # what publish names a checkpoint; other folders (a user's copy) are not ones


class DamagedCheckpoint(ValueError):
    """A checkpoint's state file cannot be read; the message names it and how to go on."""


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has been renamed from its temp name and has a state file)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))  # NAME matched: digits after the prefix


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def temp_dir(root: Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is complete (the same path on every process)."""
    return root / f"{TEMP_PREFIX}{PREFIX}{step:08d}"


def remove(folder: Path) -> None:
    """Delete a checkpoint folder so that at no moment it is half-deleted yet complete-looking."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder)


def remove_leftovers(root: Path) -> list[Path]:
    """Delete temp folders of saves that were killed; returns what was removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TEMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p)
    return stale


def publish(root: Path, tmp: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Add the state file (written last) and rename `tmp` to step-XXXXXXXX; then drop all but the newest `keep`."""
    final = root / f"{PREFIX}{step:08d}"
    with (tmp / STATE_FILE).open("w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    apply_umask(tmp)  # save_state's weights are owner-only (safetensors); a resume may run as another user
    if final.exists():  # re-saving the same step (e.g. after a resume): the older copy stops counting first
        remove(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        remove(old)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{str(path)!r} is damaged ({e}); {how_to_go_on(checkpoint)}") from e
    if not isinstance(state, dict):
        raise DamagedCheckpoint(
            f"{str(path)!r} holds a JSON {type(state).__name__}, not an object; {how_to_go_on(checkpoint)}"
        )
    return state


def how_to_go_on(checkpoint: Path) -> str:
    """Advice for a checkpoint that cannot be resumed from."""
    return (
        f"delete {str(checkpoint)!r} to resume from the checkpoint before it, or start over with --train.overwrite=true"
    )
