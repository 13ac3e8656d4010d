"""Loaded weights that own their memory.

safetensors and `torch.load(mmap=True)` hand out CPU tensors that are views of the memory-mapped file when no dtype
or device change copies them. A long-lived process (ComfyUI keeps loaded models cached) would then see the model
change when the file is overwritten in place, or die of SIGBUS when it is truncated. Loaders copy such weights.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["cpu_bytes", "own_module", "own_tensors"]


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.device.type == "cpu" else t  # other devices hold copies already


@torch.no_grad()
def own_module(module: nn.Module) -> nn.Module:
    """Give every CPU parameter and buffer of `module` memory of its own (shared parameters stay shared)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        t.data = _own(t.data)
    return module


def own_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, each CPU one copied into memory of its own."""
    return {key: _own(t) for key, t in tensors.items()}


def cpu_bytes(modules: tuple[nn.Module, ...] = (), tensors: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of host memory the CPU parameters and buffers of `modules` and the CPU `tensors` hold (shared ones
    once): what a loaded model answers to ComfyUI's RAM cache (`get_ram_usage`)."""
    seen: dict[int, int] = {}
    for t in itertools.chain(*(itertools.chain(m.parameters(), m.buffers()) for m in modules), tensors):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
