"""Checks that run before anything is loaded, so a wrong path or option fails in a second, not after model loading;
and the errors the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from . import checkpoints
from .config import RunConfig

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # what a run writes besides checkpoints and its export


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
    m, d = cfg.model, cfg.data
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
    check_output_dir(cfg)
    check_cache_dir(cfg)


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (created with its missing parents), or None."""
    made = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # the writer creates the rest
    if not made.is_dir() or not os.access(made, os.W_OK | os.X_OK):  # access() also says no on a read-only mount
        return f"{str(made)!r} is not a writable folder"
    return None


def check_output_dir(cfg: RunConfig) -> None:
    """A folder this run can write, holding no earlier run unless the run continues it or starts it over."""
    t = cfg.train
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise SetupError(f"train.output_dir {t.output_dir!r} is a file; give a folder")
    if problem := unwritable(out):
        raise SetupError(f"train.output_dir {t.output_dir!r} cannot be written: {problem}")
    if (out / t.export_name).is_dir():
        raise SetupError(f"{str(out / t.export_name)!r} is a folder; the run exports its checkpoint to that path")
    # what a run leaves once it has trained (one stopped before its first logged step, e.g. on bad data, left only its
    # config and an empty metrics file: nothing to keep)
    trained = [
        n for n in ("metrics.jsonl", "summary.json", t.export_name) if (out / n).is_file() and (out / n).stat().st_size
    ]
    checkpointed = bool(checkpoints.checkpoint_dirs(out / "checkpoints"))
    earlier = (["checkpoints/"] if checkpointed else []) + trained
    finished = {"summary.json", t.export_name} & set(trained)
    if t.resume and finished and not checkpointed:
        raise SetupError(
            f"{t.output_dir!r} holds a finished run ({', '.join(earlier)}) and no checkpoint to resume from; "
            "--train.resume=true would train it again from step 0: pass --train.overwrite=true for that, or choose "
            "another train.output_dir"
        )
    if earlier and not t.resume and not t.overwrite:
        raise SetupError(
            f"{t.output_dir!r} already holds an earlier run ({', '.join(earlier)}); pass --train.resume=true to "
            "continue it, --train.overwrite=true to start over (replacing it), or choose another train.output_dir"
        )


def check_cache_dir(cfg: RunConfig) -> None:
    """The latent cache folder is rebuilt by deleting it: it must not be, or hold, the run's or the data's files."""
    if not cfg.data.cache_latents or not cfg.data.latent_cache_dir:
        return
    cache = Path(cfg.data.latent_cache_dir).resolve()
    if cache.exists() and not cache.is_dir():
        raise SetupError(f"data.latent_cache_dir {cfg.data.latent_cache_dir!r} is a file; give a folder")
    keep = {"train.output_dir": cfg.train.output_dir}
    if cfg.data.kind != "toyworld" and not any(c in cfg.data.path for c in "*?[{"):
        keep["data.path"] = cfg.data.path
    for key, value in keep.items():
        other = Path(value).resolve()
        if cache == other or cache in other.parents or (key == "data.path" and other in cache.parents):
            raise SetupError(
                f"data.latent_cache_dir {cfg.data.latent_cache_dir!r} overlaps {key} {value!r}; a stale cache is "
                "deleted to be rebuilt, so it needs a folder of its own"
            )
