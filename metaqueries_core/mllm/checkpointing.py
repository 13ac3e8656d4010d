"""Gradient checkpointing of the frozen MLLM's decoder layers on the query pass.

The MLLM's weights are frozen, but the queries' gradient flows back through every layer, so autograd keeps each
layer's activations (for Qwen2.5-VL-3B about 26 MB per layer and sample at 256 queries: ~30 GB at the reference's
batch of 32). Recomputing each layer in the backward pass keeps only its input instead.

transformers' own checkpointing cannot serve here: it acts only in training mode (the MLLM stays in eval) and drops
the KV cache of a checkpointed layer, which the query pass must read (``prefix_cache``). So each layer runs under
``torch.utils.checkpoint`` here, with its cache entry put back as it was after every call: a layer replayed in the
backward pass then reads the same prompt keys and values as in the forward, instead of its own appended twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_layers"]


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(lm).__name__} has no `layers` list of decoder layers to checkpoint")
    return layers


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))  # the keyword changed in transformers 5.24


def _run_leaving_cache(forward: Any, index: int, *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)``, then layer ``index``'s cache entry restored to what it held before."""
    cache = _cache_of(kwargs)
    entry = cache.layers[index] if cache is not None else None
    before = dict(entry.__dict__) if entry is not None else None
    try:
        return forward(*args, **kwargs)
    finally:
        if entry is not None:
            entry.__dict__.clear()
            entry.__dict__.update(before)


@contextmanager
def checkpointed_layers(lm: nn.Module) -> Iterator[None]:
    """Within the block, each decoder layer of ``lm`` is recomputed in the backward pass instead of keeping its
    activations, and leaves the KV cache it is given unchanged (the result and the gradients are the same)."""
    layers = _decoder_layers(lm)
    for index, layer in enumerate(layers):
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Any = forward, _index: int = index, **kwargs: Any) -> Any:
            return checkpoint(_run_leaving_cache, _forward, _index, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed  # an instance attribute: the class's forward is untouched
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
