"""Whether a state dict fits a module, checked before any tensor is copied (so a misfit changes nothing)."""

from __future__ import annotations

import torch
from torch import nn


def misfit(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading strictly into `module`: missing and unexpected keys and wrong shapes, named
    (a few of each when there are many); "" when it fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", shapes))
        if keys
    ]
    return "; ".join(problems)
