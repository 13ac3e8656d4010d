"""What a resumed run may change against the checkpoint it continues, checked before any state is loaded.

A checkpoint stores the config it was trained with. Resuming continues that run, so only settings that say where
things are, when to log / save / sample, and how long and how fast to train from here (the schedule is recomputed
at the checkpoint's step) may differ; anything else would silently make the rest of the run a different one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config_io import config_to_dict

# Keys (dotted) a resumed run may change. Numerically neutral switches (gradient checkpointing, prefix cache, latent
# cache) are here too: they change memory and speed, not the result.
MAY_CHANGE = frozenset(
    {
        "model.mllm",
        "model.decoder",
        "data.path",
        "data.cache_latents",
        "data.latent_cache_dir",
        "optim.lr",
        "optim.queries_lr",
        "optim.decoder_lr",
        "optim.grad_clip",
        "optim.warmup_steps",
        "optim.min_lr_ratio",
        "train.steps",
        "train.gradient_checkpointing",
        "train.prefix_cache",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.sample_every",
        "train.sample_prompts",
        "train.sample_steps",
        "train.guidance",
        "train.image_guidance",
        "train.log_every",
        "train.output_dir",
        "train.resume",
        "train.overwrite",
        "train.report_to",
        "train.export_name",
    }
)


def section_names(obj: Any, prefix: str = "") -> set[str]:
    """Dotted names of the dataclass sections inside config `obj` (model, model.connector, data, ...)."""
    names: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            name = f"{prefix}{f.name}"
            names |= {name} | section_names(value, f"{name}.")
    return names


def flatten(tree: dict[str, Any], sections: set[str], prefix: str = "") -> dict[str, Any]:
    """A config as nested dicts -> {"section.key": value}; a mapping-valued field (a caption mix) is one value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in sections and isinstance(value, dict):
            out.update(flatten(value, sections, f"{name}."))
        else:
            out[name] = value
    return out


def resume_problems(saved: dict[str, Any], cfg: Any, step: int) -> list[str]:
    """Why `cfg` cannot continue the run whose checkpoint at `step` was trained with `saved` (its config as a dict)."""
    sections = section_names(cfg)
    before, now = flatten(saved, sections), flatten(config_to_dict(cfg), sections)
    problems = [
        f"{key}: checkpoint {before.get(key)!r}, now {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if key not in MAY_CHANGE and before.get(key) != now.get(key)
    ]
    if cfg.train.steps <= step:
        problems.append(f"train.steps: {cfg.train.steps} leaves nothing to train after the checkpoint's step {step}")
    return problems
