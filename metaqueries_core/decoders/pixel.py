"""Pixel space as a stand-in "autoencoder": a Sana-class transformer that denoises RGB directly.

Used where no pretrained VAE exists (the offline toy world): a diffusers Sana folder whose `model_index.json` says
`"vae": [null, null]` and whose transformer has 3 input channels loads with this identity in place of the DC-AE.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class PixelSpace(nn.Module):
    """Identity encode/decode with the attributes the decoder adapters read from a VAE (factor 1, 3 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            latent_channels=3, encoder_block_out_channels=[3], scaling_factor=1.0, shift_factor=0.0
        )
        # carries the device and dtype (the adapters read them from the first parameter); never trained
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode(self, images: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (images,)  # (B, 3, H, W) in [-1, 1]

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (latents,)  # (B, 3, H, W)
