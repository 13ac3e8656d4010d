"""Text-only causal LMs (Qwen2, Qwen3): no images, plain rotary positions."""

from __future__ import annotations

from torch import nn

from .base import MLLMAdapter


class TextLMAdapter(MLLMAdapter):
    model_types = ("qwen2", "qwen3")
    image_token = None
    default_max_images = 0

    @property
    def language_model(self) -> nn.Module:
        return self.model.model
