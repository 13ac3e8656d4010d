"""LLaVA-OneVision: SigLIP tower with any-resolution tiles (single images) or base tiles (several images)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import MLLMAdapter


class LlavaOneVisionAdapter(MLLMAdapter):
    model_types = ("llava_onevision",)
    image_token = "<image>"
    default_max_images = 8

    def image_features(
        self, images: list[list[Image.Image]], *, min_tokens: None = None
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        cfg = self.model.config
        with_images = [sample for sample in images if sample]
        px = self.image_processor(images=with_images, return_tensors="pt")
        # one image in a sample gets any-resolution tiles; several images get one base tile each (as upstream)
        num_images = torch.tensor([len(s) for s in with_images], device=self.device)
        pixel_values = px["pixel_values"].to(self.device, self.dtype)  # (num_images, tiles, 3, h, w)
        image_sizes = px["image_sizes"].to(self.device)  # (num_images, 2)
        feats = self.model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            batch_num_images=num_images,
        ).pooler_output
        extra = {"pixel_values": pixel_values, "image_sizes": image_sizes, "batch_num_images": num_images}
        return list(feats), extra
