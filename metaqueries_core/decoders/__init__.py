"""Diffusion decoder adapters (Sana, SD1.5) behind one interface, and a loader that detects the family of a folder.

Only local diffusers folders (or an SD single-file checkpoint plus a local config folder) are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..memory import own_module
from .base import SCHEDULER_NAMES, DecoderAdapter, PathLike, read_json
from .sana import SanaAdapter
from .sd15 import SD15Adapter

DECODERS: dict[str, type[DecoderAdapter]] = {"sana": SanaAdapter, "sd15": SD15Adapter}

# Denoiser / pipeline class names (as written in config.json / model_index.json) -> family.
DENOISER_CLASSES: dict[str, str] = {"SanaTransformer2DModel": "sana", "UNet2DConditionModel": "sd15"}
PIPELINE_CLASSES: dict[str, str] = {
    "SanaPipeline": "sana",
    "SanaPAGPipeline": "sana",
    "StableDiffusionPipeline": "sd15",
}

__all__ = [
    "DECODERS",
    "SCHEDULER_NAMES",
    "DecoderAdapter",
    "SD15Adapter",
    "SanaAdapter",
    "detect_family",
    "load_decoder",
]


def _supported() -> str:
    return ", ".join(DECODERS)


def detect_family(path: PathLike) -> str:
    """The decoder family of a local diffusers folder, from class names in its configs (never from folder names).

    Looks at ``transformer/config.json`` and ``unet/config.json`` (``_class_name``), then ``model_index.json``
    (its ``transformer``/``unet`` component entries, then its pipeline ``_class_name``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"decoder folder {folder} does not exist or is not a folder")
    seen: list[str] = []
    for sub in ("transformer", "unet"):
        config = read_json(folder / sub / "config.json")
        if config is not None:
            name = str(config.get("_class_name"))
            seen.append(f"{sub}/config.json: {name}")
            if name in DENOISER_CLASSES:
                return DENOISER_CLASSES[name]
    index = read_json(folder / "model_index.json")
    if index is not None:
        for sub in ("transformer", "unet"):
            entry = index.get(sub)
            if isinstance(entry, list) and len(entry) == 2 and entry[1] in DENOISER_CLASSES:
                return DENOISER_CLASSES[entry[1]]
        name = str(index.get("_class_name"))
        seen.append(f"model_index.json: {name}")
        if name in PIPELINE_CLASSES:
            return PIPELINE_CLASSES[name]
    found = f"found {'; '.join(seen)}" if seen else "found none of these files"
    raise ValueError(
        f"{folder} is not a supported diffusers decoder folder: looked for transformer/config.json "
        "(SanaTransformer2DModel), unet/config.json (UNet2DConditionModel) or a model_index.json naming one of "
        f"them; {found}. Supported families: {_supported()}"
    )


def load_decoder(
    path: PathLike,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PathLike | None = None,
    **options: Any,
) -> DecoderAdapter:
    """Load a decoder adapter from a local diffusers folder, detecting the family unless ``family`` is given.

    ``path`` may also be an SD single-file checkpoint (``.safetensors``/``.ckpt``) when ``config`` names a local
    diffusers folder holding its ``unet/``/``vae/`` configs. ``options`` go to the adapter's ``from_folder``
    (e.g. ``prediction_type`` for sd15, ``flow_shift``/``train_shift`` for sana, ``vae_dtype``, ``variant``)."""
    if family is not None and family not in DECODERS:
        raise ValueError(f"unknown decoder family {family!r}; supported: {_supported()}")
    target = Path(path).expanduser()
    if target.is_file():
        if config is None:
            raise ValueError(
                f"{target} is a single file; single-file checkpoints need config= a local diffusers folder with "
                "unet/config.json and vae/config.json (only the sd15 family supports single files)"
            )
        family = family or detect_family(config)
        if family != "sd15":
            raise ValueError(f"single-file checkpoints are only supported for the sd15 family, not {family!r}")
        decoder = SD15Adapter.from_single_file(target, config=config, dtype=dtype, device=device, **options)
    else:
        if not target.exists():
            raise FileNotFoundError(f"decoder path {target} does not exist")
        family = family or detect_family(target)
        decoder = DECODERS[family].from_folder(target, dtype=dtype, device=device, **options)
    own_module(decoder.denoiser)  # not views of the files (memory.py)
    own_module(decoder.vae)
    return decoder
