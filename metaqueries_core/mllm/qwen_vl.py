"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower and multimodal rotary positions (3, B, L)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import MLLMAdapter

# The reference trainer's cap on an input image (models/model.py: max_pixels 1280 * 28 * 28, i.e. 1280 merged
# patches = image tokens); the released folders allow 16384 tokens (a phone photo would give 15552).
REFERENCE_MAX_IMAGE_TOKENS = 1280


class QwenVLAdapter(MLLMAdapter):
    model_types = ("qwen2_5_vl", "qwen2_vl")
    image_token = "<|image_pad|>"
    default_max_images = 8
    scales_images = True

    def __init__(self, *, max_image_tokens: int | None = REFERENCE_MAX_IMAGE_TOKENS, **kwargs: Any) -> None:
        """`max_image_tokens` caps the tokens of one input image below the image processor's own pixel limit
        (None: the folder's setting as it is)."""
        super().__init__(**kwargs)
        size = dict(self.image_processor.size)  # {"shortest_edge": min pixels, "longest_edge": max pixels}
        if max_image_tokens is not None:
            if max_image_tokens < 1:
                raise ValueError(f"max_image_tokens must be >= 1 (or None: the folder's limit), got {max_image_tokens}")
            token_pixels = self.min_image_side**2  # one merged patch
            size["longest_edge"] = min(
                size["longest_edge"], max(max_image_tokens * token_pixels, size["shortest_edge"])
            )
        self.image_size = size

    def pixel_range(self, min_tokens: int | None) -> dict[str, int]:
        """The processor's {"shortest_edge": min pixels, "longest_edge": max pixels}, with the minimum raised to
        `min_tokens` merged patches (the reference's min_pixels 256 * 28 * 28); a minimum above the cap wins."""
        if min_tokens is None:
            return self.image_size
        least = max(self.image_size["shortest_edge"], min_tokens * self.min_image_side**2)
        return {"shortest_edge": least, "longest_edge": max(self.image_size["longest_edge"], least)}

    @property
    def min_image_side(self) -> int:
        # the processor's smart_resize needs at least one merged patch per side
        return self.image_processor.patch_size * self.image_processor.merge_size

    @property
    def max_image_aspect(self) -> float:
        return 200.0  # transformers' smart_resize raises above this ratio

    def image_features(
        self, images: list[list[Image.Image]], *, min_tokens: int | None = None
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        flat = [im for sample in images for im in sample]
        px = self.image_processor(images=flat, size=self.pixel_range(min_tokens), return_tensors="pt")
        pixel_values = px["pixel_values"].to(self.device, self.dtype)  # (sum of patches, C*T*P*P)
        grid = px["image_grid_thw"].to(self.device)  # (num_images, 3)
        feats = self.model.model.get_image_features(pixel_values, grid).pooler_output  # tuple of (n_i, D)
        return list(feats), {"pixel_values": pixel_values, "image_grid_thw": grid}

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]
    ) -> torch.Tensor:
        token_types = (input_ids == self.image_token_id).int()  # (B, L) 1 on image tokens
        positions, _ = self.model.model.get_rope_index(
            input_ids, token_types, image_grid_thw=extra.get("image_grid_thw"), attention_mask=attention_mask
        )
        return positions  # (3, B, L)

    def forward_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]) -> dict:
        # the HF model needs the token types to build multimodal rotary positions
        token_types = (input_ids == self.image_token_id).int()  # (B, L)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": token_types, **extra}
