"""The conditioning probe: it reads attributes that the features carry and nothing from features that carry none."""

from __future__ import annotations

import numpy as np
import torch

from metaqueries_core.toyworld import ToyWorld
from training.toy.probe import conditioning_probe, ridge_accuracy


def test_ridge_reads_a_carried_label_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 400)  # (400,) six classes, like the colours
    carried = np.eye(6)[y] @ rng.normal(size=(6, 32)) + 0.1 * rng.normal(size=(400, 32))  # (400, 32)
    noise = rng.normal(size=(400, 32))  # (400, 32)
    assert ridge_accuracy(carried[:300], y[:300], carried[300:], y[300:]) == 1.0
    assert ridge_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.35


def test_probe_reports_every_attribute_and_chance_for_a_prompt_blind_head(mllm_loader, decoder_loader, make_head):
    mllm = mllm_loader("qwen2_5_vl")
    head = make_head(mllm, decoder_loader("sana")).eval()
    world = ToyWorld(size=32, seed=0)
    res = conditioning_probe(mllm, head, world, n_fit=40, n_test=20, batch=20)
    assert set(res) == {"single", "two_object"}
    assert set(res["single"]) == {"colour", "shape", "position"}
    assert set(res["two_object"]) == {"colour1", "shape1", "colour2", "shape2", "relation"}
    assert all(0.0 <= v <= 1.0 for kind in res.values() for v in kind.values())
    # a connector whose output ignores its input: every prompt looks the same, so no attribute beats guessing
    with torch.no_grad():
        for p in head.connector.parameters():
            p.zero_()
    blind = conditioning_probe(mllm, head, world, n_fit=40, n_test=20, batch=20)
    assert all(v <= 0.6 for kind in blind.values() for v in kind.values())
