"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""

import contextlib
import os
import stat
from pathlib import Path

MLLM_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl", "qwen2", "qwen3"]
VISION_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl"]


def trainer_args(folders, out, *extra: str) -> list[str]:
    """CLI overrides of a few-step toy-world training run on the tiny folders (MLLM, decoder); an `extra` override
    replaces the default of its key (the CLI refuses a key given twice)."""
    defaults = [
        f"--model.mllm={folders[0]}",
        f"--model.decoder={folders[1]}",
        "--model.num_queries=4",
        "--model.connector.depth=1",
        "--data.toyworld_size=32",
        "--optim.warmup_steps=1",
        "--train.batch_size=2",
        "--train.sample_every=0",
        "--train.log_every=1",
        f"--train.output_dir={out}",
    ]
    return merged(defaults, extra)


def merged(defaults, extra) -> list[str]:
    """`defaults` with every `--key=value` of `extra` replacing the one of the same key (added when new)."""
    given = {arg.partition("=")[0] for arg in extra}
    return [arg for arg in defaults if arg.partition("=")[0] not in given] + list(extra)


@contextlib.contextmanager
def umask(mask: int):
    """The process umask set to `mask` inside the block, restored after it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def file_modes(path: Path) -> dict[str, int]:
    """Permission bits of every file and folder below `path` (relative name -> mode; folders end in "/")."""
    found = {}
    for p in sorted(path.rglob("*")):
        if not p.is_symlink():
            found[p.relative_to(path).as_posix() + ("/" if p.is_dir() else "")] = stat.S_IMODE(p.stat().st_mode)
    return found


def odd_modes(path: Path, mask: int) -> dict[str, int]:
    """Files and folders below `path` whose mode is not what a new one gets under `mask` (0666 / 0777 & ~mask)."""
    want = {False: 0o666 & ~mask, True: 0o777 & ~mask}
    return {name: mode for name, mode in file_modes(path).items() if mode != want[name.endswith("/")]}
