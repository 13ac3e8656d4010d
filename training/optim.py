"""AdamW parameter groups (weight decay only on trained matrices) and the warm-up + cosine schedule."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .config import OptimSection

log = logging.getLogger(__name__)

HEAD_ROLES = ("queries", "connector")  # what `head_hold_steps` holds back


def param_groups(modules: dict[str, nn.Module], cfg: OptimSection) -> list[dict]:
    """One group per (role, decay) pair. Roles: 'queries', 'connector', 'decoder'. Norm weights, biases and the
    queries get no weight decay: decaying them pulls toward zero with no regularising purpose."""
    lrs = {
        "queries": cfg.lr if cfg.queries_lr is None else cfg.queries_lr,  # 0 is a rate: the queries stay as they start
        "connector": cfg.lr,
        "decoder": cfg.lr if cfg.decoder_lr is None else cfg.decoder_lr,
    }
    groups = []
    for role, module in modules.items():
        decay, no_decay = [], []
        for p in module.parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and role != "queries" else no_decay).append(p)
        if role not in lrs:
            raise ValueError(f"unknown parameter role {role!r}; expected one of {sorted(lrs)}")
        for params, wd, tag in ((decay, cfg.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": lrs[role], "weight_decay": wd, "name": f"{role}/{tag}"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return groups


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one call per step instead of ~10 ops per tensor): over 180 tensors of the toy
    models' sizes on one CPU thread an update took 15 ms single-tensor (CPU's default), 1 ms fused; a toy pretrain
    step 7% less (benchmarks/TOYWORLD.md). Same algorithm, same results up to float rounding. `params`: tensors or
    parameter groups, as torch.optim.AdamW takes them."""
    return torch.optim.AdamW(params, fused=True, **kw)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    modules: dict[str, nn.Module], cfg: OptimSection, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(modules, cfg)
    if cfg.head_hold_steps and cfg.head_hold_steps >= total_steps:
        raise ValueError(
            f"optim.head_hold_steps={cfg.head_hold_steps} must be below train.steps={total_steps}: "
            "the queries and connector would never train"
        )
    opt = adamw(groups, betas=tuple(cfg.betas))
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))

    def schedule(s: int) -> float:
        return warmup_cosine(s, warmup=warmup, total=total_steps, min_ratio=cfg.min_lr_ratio)

    def held(s: int) -> float:  # the head's schedule starts after the hold, over the steps that remain
        if s < cfg.head_hold_steps:
            return 0.0
        rest = max(1, total_steps - cfg.head_hold_steps)
        return warmup_cosine(
            s - cfg.head_hold_steps, warmup=min(warmup, rest - 1), total=rest, min_ratio=cfg.min_lr_ratio
        )

    lambdas = [held if g["name"].split("/")[0] in HEAD_ROLES else schedule for g in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def _lambda_lr(scheduler: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it


def current_rates(scheduler: Any) -> list[float]:
    """Every parameter group's base learning rate (what the config asked for, before a checkpoint is loaded)."""
    return list(_lambda_lr(scheduler).base_lrs)


def set_base_rates(scheduler: Any, rates: list[float]) -> None:
    """Make `rates` the groups' base rates at the scheduler's current step. Loading a checkpoint restores the rates
    it was trained with; a resumed run that lowers optim.lr (after a divergence) must train at the new ones."""
    sched = _lambda_lr(scheduler)
    if len(rates) != len(sched.base_lrs):
        raise ValueError(f"{len(rates)} rates for {len(sched.base_lrs)} parameter groups")
    for group, old, base, schedule in zip(sched.optimizer.param_groups, sched.base_lrs, rates, sched.lr_lambdas):
        if old != base:
            log.info("%s: learning rate %g (the checkpoint trained at %g)", group["name"], base, old)
        group["initial_lr"] = base
        group["lr"] = base * schedule(sched.last_epoch)
    sched.base_lrs = list(rates)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
