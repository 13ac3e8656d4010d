"""Text-only causal LMs (Qwen2, Qwen3): no images, plain rotary positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .base import MLLMAdapter


class TextLMAdapter(MLLMAdapter):
    model_types = ("qwen2", "qwen3")
    image_token = None
    default_max_images = 0

    @classmethod
    def from_folder(cls, path: Path, *, dtype: torch.dtype, device: str | torch.device, **options: Any) -> MLLMAdapter:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model=model, tokenizer=tokenizer, name=str(path), **options)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model
