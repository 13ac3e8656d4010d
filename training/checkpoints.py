"""Training-state checkpoints: written to a temporary folder and renamed into place, so a kill during a save
leaves the previous checkpoint intact; the newest complete one is what `--train.resume` continues from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
PREFIX = "step-"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has been renamed from its temp name and has a state file)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def temp_dir(root: Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is complete (the same path on every process)."""
    return root / f".tmp-{PREFIX}{step:08d}"


def publish(root: Path, tmp: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Add the state file (written last) and rename `tmp` to step-XXXXXXXX; then drop all but the newest `keep`."""
    final = root / f"{PREFIX}{step:08d}"
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
