"""What a resumed run may change against the checkpoint it continues, checked before any state is loaded.

A checkpoint stores the config it was trained with. Resuming continues that run, so only settings that say where
things are, when to log / save / sample, and how long and how fast to train from here (the schedule is recomputed
at the checkpoint's step) may differ; anything else would silently make the rest of the run a different one.
"""

from __future__ import annotations

from typing import Any

from .config_io import config_from_dict, leaf_values

# Keys (dotted) a resumed run may change. Numerically neutral switches (gradient checkpointing, prefix cache, latent
# cache) are here too: they change memory and speed, not the result.
MAY_CHANGE = frozenset(
    {
        "model.mllm",
        "model.decoder",
        "model.init_checkpoint",  # a path like the two above (a moved run folder); a resume reads its own weights
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


def resume_problems(saved: dict[str, Any], cfg: Any, step: int) -> list[str]:
    """Why `cfg` cannot continue the run whose checkpoint at `step` was trained with `saved` (its config as a dict)."""
    try:
        before = leaf_values(config_from_dict(type(cfg), saved))
    except ValueError as e:  # a ConfigError: written by a version with other config keys
        return [f"the checkpoint's config does not read as this version's: {e}"]
    now = leaf_values(cfg)
    problems = [
        f"{key}: checkpoint {before[key]!r}, now {now[key]!r}"
        for key in now
        if key not in MAY_CHANGE and before[key] != now[key]
    ]
    if cfg.train.steps <= step:
        problems.append(f"train.steps: {cfg.train.steps} leaves nothing to train after the checkpoint's step {step}")
    return problems
