"""MLLM adapters, registered by `config.model_type` (never by a substring of a hub id or folder name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..memory import own_module
from .base import DEFAULT_SYSTEM_PROMPT, MLLMAdapter, PromptBatch
from .internvl import InternVLAdapter
from .layout import PromptLayout
from .llava_onevision import LlavaOneVisionAdapter
from .qwen_vl import QwenVLAdapter
from .text_lm import TextLMAdapter

MLLM_ADAPTERS: dict[str, type[MLLMAdapter]] = {
    model_type: adapter
    for adapter in (QwenVLAdapter, LlavaOneVisionAdapter, InternVLAdapter, TextLMAdapter)
    for model_type in adapter.model_types
}


def read_model_type(path: str | Path) -> str:
    """`model_type` of a local Hugging Face folder, with errors that name the folder."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"MLLM folder {str(path)!r} does not exist")
    if not config.is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        model_type = json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{str(config)!r} has no readable 'model_type': {e}") from e
    return model_type


# model types of layouts that a supported family also ships in, and what to load instead
OTHER_LAYOUTS = {
    "internvl_chat": "this is InternVL's remote-code layout; load its transformers-native '-hf' folder instead "
    "(model_type 'internvl', e.g. OpenGVLab/InternVL3-1B-hf)",
}


def adapter_for(model_type: str) -> type[MLLMAdapter]:
    if model_type not in MLLM_ADAPTERS:
        hint = f": {OTHER_LAYOUTS[model_type]}" if model_type in OTHER_LAYOUTS else ""
        raise ValueError(f"unsupported MLLM model_type {model_type!r}{hint}; supported: {sorted(MLLM_ADAPTERS)}")
    return MLLM_ADAPTERS[model_type]


def load_mllm(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **options: Any
) -> MLLMAdapter:
    """Load a frozen MLLM from a local folder through the adapter of its `config.model_type`."""
    adapter = adapter_for(read_model_type(path))
    mllm = adapter.from_folder(Path(path), dtype=dtype, device=device, **options)
    own_module(mllm.model)  # not views of the weight files (memory.py)
    return mllm


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "MLLM_ADAPTERS",
    "MLLMAdapter",
    "PromptBatch",
    "PromptLayout",
    "adapter_for",
    "load_mllm",
]
