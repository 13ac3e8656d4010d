"""What a run writes besides checkpoints: `metrics.jsonl` (one JSON object per logged step), `summary.json` at the
end, and the replica check of multi-process runs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

from .preflight import SetupError

log = logging.getLogger(__name__)

# Replicas hold whole copies of the trained weights only under plain data parallelism; FSDP / DeepSpeed shard them.
REPLICATED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class MetricsLog:
    """Appends records to `metrics.jsonl` on the main process (and to the accelerate trackers when configured).

    On resume from step S the lines of steps after S are dropped first: they were logged by the killed run after
    its last checkpoint and are about to be logged again, so the file reads as one clean curve."""

    def __init__(self, acc: Accelerator, path: Path, *, resume_step: int | None) -> None:
        self.acc = acc
        self.path = path
        if not acc.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line, record in _records(path) if record["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.acc.log_with:
            self.acc.log(record, step=record["step"])


def check_metrics(path: Path) -> None:
    """Before a resume, on every process: a metrics file the main process cannot continue is refused by all of them
    (a rank left waiting for the others would hang until the collective timeout)."""
    if path.is_file():
        _records(path, warn=False)  # the main process warns when it continues the file


def _records(path: Path, *, warn: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of a metrics file. A last line cut short by a kill mid-write is dropped (its step is logged
    again after the checkpoint); any other unreadable line is an error naming it."""
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                if warn:
                    log.warning("%s: dropped its last line, cut short when the run was killed: %r", path, line[:80])
                break
            raise SetupError(
                f"{path} line {number} is not a JSON record ({e}): {line[:80]!r}; mend or delete that line to resume"
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise SetupError(
                f"{path} line {number} is not a record with a 'step': {line[:80]!r}; mend or delete that line to resume"
            )
        out.append((line, record))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, shapes and exact bytes of the trainable parameters (in name order)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def replica_fingerprints(acc: Accelerator, module: nn.Module) -> list[str] | None:
    """Each process's fingerprint of its trained weights (a collective: call on every process); None when the
    weights are sharded (FSDP / DeepSpeed), where per-process copies are not whole replicas."""
    if acc.distributed_type not in REPLICATED:
        return None
    fingerprints = gather_object([weights_fingerprint(module)])
    if len(set(fingerprints)) > 1:
        log.error("the processes hold different weights after training: %s", fingerprints)
    return fingerprints


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
