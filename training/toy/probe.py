"""Which side of a MetaQuery model loses a prompt's attributes: a linear probe on the conditioning.

A ridge regression reads each attribute of a caption (colour, shape, position of one object; colour and shape of both
objects and their relation for two-object captions) from the connector's output, fitted on train captions and scored
on other train captions. Near chance: the conditioning already lost the attribute. Near 1.0: it is there, but not
necessarily in a form the decoder can bind: the probe reads all N tokens at once, the decoder's cross-attention
reads them one by one and without their places, so the probe read 1.0 alike in runs whose two-object all-correct
was 0.16 (run Z), 0.42 (NS) and 0.93 (F1) (benchmarks/TOYWORLD.md). The taught toy MLLM's query states carry every attribute
before generation training starts (a 30-step run reads 1.0 too), so this checks the MLLM side of a run; it does
not measure what training added.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from metaqueries_core.head import MetaQueryHead
from metaqueries_core.mllm import MLLMAdapter
from metaqueries_core.toyworld import ToyWorld
from metaqueries_core.toyworld.world import COLOURS, POSITIONS, RELATIONS, SHAPES, CaptionSample

RIDGE = 100.0  # on standardised features: enough to keep 2048 features from memorising a few hundred captions


def _attributes(kind: str, s: CaptionSample) -> dict[str, int]:
    """Class index of each attribute a caption of `kind` claims."""
    objs, colours = s.scene.objects, list(COLOURS)
    if kind == "single":
        o = objs[0]
        return {
            "colour": colours.index(o.colour),
            "shape": SHAPES.index(o.shape),
            "position": POSITIONS.index(o.position),
        }
    return {
        "colour1": colours.index(objs[0].colour),
        "shape1": SHAPES.index(objs[0].shape),
        "colour2": colours.index(objs[1].colour),
        "shape2": SHAPES.index(objs[1].shape),
        "relation": list(RELATIONS).index(s.scene.relation),
    }


@torch.no_grad()
def _features(mllm: MLLMAdapter, head: MetaQueryHead, prompts: list[str], batch: int) -> np.ndarray:
    rows = []
    for start in tqdm(range(0, len(prompts), batch), desc="conditioning probe", unit="batch", leave=False):
        cond, _ = head.encode(mllm, prompts[start : start + batch])  # (b, N, C)
        rows.append(cond.flatten(1).float().cpu().numpy())  # (b, N * C)
    x = np.concatenate(rows)  # (n, N * C)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def ridge_accuracy(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of a one-vs-all ridge classifier fitted on (x_fit, y_fit) on the test rows."""
    onehot = np.eye(int(max(y_fit.max(), y_test.max())) + 1)[y_fit]  # (n_fit, classes)
    w = np.linalg.solve(x_fit.T @ x_fit + RIDGE * np.eye(x_fit.shape[1]), x_fit.T @ onehot)  # (features, classes)
    return float(((x_test @ w).argmax(1) == y_test).mean())


def conditioning_probe(
    mllm: MLLMAdapter, head: MetaQueryHead, world: ToyWorld, *, n_fit: int = 600, n_test: int = 200, batch: int = 100
) -> dict[str, dict[str, float]]:
    """Probe accuracy per attribute of single-object and two-object (relation) train captions."""
    out: dict[str, dict[str, float]] = {}
    for kind, layout in (("single", "placed"), ("two_object", "relation")):
        samples = [world.caption_sample("train", i, (layout,)) for i in range(n_fit + n_test)]
        x = _features(mllm, head, [s.caption for s in samples], batch)
        labels = [_attributes(kind, s) for s in samples]
        out[kind] = {}
        for name in labels[0]:
            y = np.array([row[name] for row in labels])  # (n_fit + n_test,) class indices
            out[kind][name] = round(ridge_accuracy(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]), 3)
    return out
