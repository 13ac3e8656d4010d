"""Optimizer groups and schedules: the head hold keeps queries + connector still while the decoder trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.config import OptimSection
from training.optim import adamw, make_optimizer


def roles() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"queries": nn.Linear(4, 4), "connector": nn.Linear(4, 4), "decoder": nn.Linear(4, 4)}


def snapshot(modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    return {r: [p.detach().clone() for p in m.parameters()] for r, m in modules.items()}


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_head_hold_keeps_queries_and_connector_still_then_trains_them():
    modules = roles()
    cfg = OptimSection(lr=1e-2, warmup_steps=2, weight_decay=0.1, head_hold_steps=3)
    opt, sched = make_optimizer(modules, cfg, total_steps=10)
    start = snapshot(modules)
    x = torch.randn(8, 4)
    history = []
    for _ in range(6):
        loss = modules["decoder"](modules["connector"](modules["queries"](x))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append({r: changed(start[r], m) for r, m in modules.items()})
    # decoder trains from the first step; the head is bit-identical through the hold (weight decay included)
    assert [h["decoder"] for h in history] == [True] * 6
    for role in ("queries", "connector"):
        assert [h[role] for h in history] == [False, False, False, True, True, True], role
    # after the hold the head warms up over its own warm-up: first step at half the LR, then the full LR
    head_lrs = [g["lr"] for g in opt.param_groups if g["name"].startswith("connector/")]
    assert head_lrs and all(lr < cfg.lr for lr in head_lrs)


def test_head_hold_schedule_values():
    cfg = OptimSection(lr=1.0, warmup_steps=2, min_lr_ratio=0.0, head_hold_steps=4)
    opt, sched = make_optimizer(roles(), cfg, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    head = [row["queries/no_decay"] for row in lrs]
    decoder = [row["decoder/decay"] for row in lrs]
    assert head[:4] == [0.0] * 4
    assert head[4:6] == pytest.approx([0.5, 1.0])  # warm-up restarts after the hold
    assert head[-1] < head[6] and decoder[:2] == pytest.approx([0.5, 1.0])
    assert decoder[4] > 0 and decoder[-1] < decoder[2]


def test_head_hold_must_leave_steps_to_train_and_be_non_negative():
    with pytest.raises(ValueError, match=r"head_hold_steps=10 must be below train.steps=10"):
        make_optimizer(roles(), OptimSection(head_hold_steps=10), total_steps=10)
    with pytest.raises(ValueError, match=r"head_hold_steps must be >= 0, got -1"):
        OptimSection(head_hold_steps=-1)


def test_fused_adamw_takes_the_reference_steps():
    """`adamw` (fused kernel) follows torch's single-tensor AdamW step for step: only the speed differs."""
    models = []
    for make in (adamw, lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 3))
        start = model[0].weight.detach().clone()
        opt = make(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        x = torch.randn(16, 6)
        for _ in range(20):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (models[0][0].weight - start).abs().max() > 1e-2  # it did train


def test_a_zero_rate_for_queries_or_decoder_keeps_them_as_they_start():
    modules = roles()
    cfg = OptimSection(lr=1e-2, warmup_steps=1, queries_lr=0.0, decoder_lr=0.0)
    opt, sched = make_optimizer(modules, cfg, total_steps=4)
    start = snapshot(modules)
    for _ in range(3):
        sum(m(torch.ones(1, 4)).square().sum() for m in modules.values()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert not changed(start["queries"], modules["queries"]) and not changed(start["decoder"], modules["decoder"])
    assert changed(start["connector"], modules["connector"])
