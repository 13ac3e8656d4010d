"""Checks that run before anything is loaded, so a wrong path or option fails in a second, not after model loading;
and the errors the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations

import glob
from pathlib import Path

from . import checkpoints
from .config import RunConfig


class SetupError(ValueError):
    """The run cannot start as configured (a missing path, an invalid combination of options, a used output folder)."""


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became inf / NaN; the message names the last good checkpoint."""


def _need_folder(key: str, value: str, what: str) -> None:
    if not value:
        raise SetupError(f"{key} is empty: give the local folder of the {what}")
    path = Path(value).expanduser()
    if not path.is_dir():
        hint = "it is a file, not a folder" if path.is_file() else "it does not exist"
        raise SetupError(f"{key} folder {str(path)!r} cannot be used: {hint} (expected a local {what} folder)")


def _data_path_exists(kind: str, path: str) -> bool:
    if kind == "webdataset" and any(c in path for c in "*?[{"):
        return bool(glob.glob(path.split("{")[0] + "*"))  # brace / glob patterns: the reader expands and checks them
    return Path(path).expanduser().exists()


def check_run(cfg: RunConfig) -> None:
    """Raise SetupError naming the key for every problem that can be seen from the config and the file system."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _need_folder("model.mllm", m.mllm, "Hugging Face MLLM (config.json, weights, tokenizer)")
    _need_folder("model.decoder", m.decoder, "diffusers decoder (transformer/ or unet/, vae/)")
    if m.init_checkpoint and not Path(m.init_checkpoint).expanduser().is_file():
        raise SetupError(f"model.init_checkpoint {m.init_checkpoint!r} is not a file (expected a .safetensors export)")
    if d.kind != "toyworld":
        if not d.path:
            raise SetupError(f"data.path is empty: data.kind={d.kind!r} needs the path of the dataset")
        if not _data_path_exists(d.kind, d.path):
            raise SetupError(f"data.path {d.path!r} does not exist (data.kind={d.kind!r})")
    if d.cache_latents and d.random_crop:
        raise SetupError(
            "data.cache_latents needs deterministic targets, but data.random_crop is true (every epoch crops anew, "
            "so a latent encoded once would be wrong); set data.random_crop=false or data.cache_latents=false"
        )
    ckpt_root = Path(t.output_dir) / "checkpoints"
    if not t.resume and not t.overwrite and checkpoints.checkpoint_dirs(ckpt_root):
        raise SetupError(
            f"{str(ckpt_root)!r} already holds checkpoints of an earlier run; pass --train.resume=true to continue "
            "it, --train.overwrite=true to start over (deleting them), or choose another train.output_dir"
        )
