"""InternVL3 in its transformers-native form (`InternVLForConditionalGeneration`, the "-hf" folders).

Quirks:
- The chat template writes `<IMG_CONTEXT>` once per image; upstream's processor replaces it with
  `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, and the features go where `<IMG_CONTEXT>` is.
- Each image is cut into square tiles (the image processor's `size`): a grid of `min_patches`..`max_patches` tiles
  whose shape is closest to the image's, plus a thumbnail of the whole image when there is more than one tile.
  Upstream's processor always asks for this (`crop_to_patches=True`) whatever the folder's image processor says.
- The vision tower returns features per tile (tiles, tokens, D) after a 2x2 pixel shuffle; they are regrouped per
  image here, so that one image's feature count is its number of `<IMG_CONTEXT>` tokens.
- The language model (Qwen2 in InternVL3) uses plain 1D rotary positions: the base class's default.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import MLLMAdapter


class InternVLAdapter(MLLMAdapter):
    model_types = ("internvl",)
    image_token = "<IMG_CONTEXT>"
    start_token = "<img>"
    end_token = "</img>"
    default_max_images = 8

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (self.image_token, self.start_token, self.end_token) if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer of MLLM {self.name!r} (internvl) lacks the image tokens {missing}; an InternVL-hf "
                f"folder's tokenizer has {self.start_token}, {self.image_token} and {self.end_token}"
            )

    def image_features(
        self, images: list[list[Image.Image]], *, min_tokens: None = None
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        flat = [im for sample in images for im in sample]
        # tile size and min / max tiles come from the folder's image processor; tiling is on, as upstream's processor
        px = self.image_processor(images=flat, crop_to_patches=True, return_tensors="pt")
        pixel_values = px["pixel_values"].to(self.device, self.dtype)  # (sum of tiles, 3, tile, tile)
        tiles = torch.as_tensor(px["num_patches"]).tolist()  # tiles per image, in order
        feats = self.model.model.get_image_features(pixel_values).pooler_output  # (sum of tiles, tokens, D)
        per_image = [f.flatten(0, 1) for f in feats.split(tiles)]  # each (tiles_i * tokens, D)
        return per_image, {"pixel_values": pixel_values}

    def expand_image(self, num_features: int) -> str:
        return self.start_token + self.image_token * num_features + self.end_token
