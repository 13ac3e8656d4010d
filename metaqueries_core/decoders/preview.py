"""Cheap sampling previews: a linear map from a decoder's latent channels to RGB, fitted on its own VAE.

ComfyUI's "latent2rgb" previews multiply each latent pixel by a fixed (3, c) matrix published per model family; core
has none for Sana's DC-AE, and a fine-tuned or toy VAE has its own. So the matrix is fitted here, once per decoder:
images of flat colour blocks are encoded, and least squares maps every latent pixel to the mean colour of the image
patch it covers. No extra weights, and one small VAE encode per loaded decoder.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import DecoderAdapter

FIT_IMAGES = 4  # images encoded for the fit
FIT_CELLS = 8  # latent pixels per side of each fit image (so FIT_IMAGES * FIT_CELLS**2 rows for c + 1 unknowns)
BLOCK = 2  # latent pixels per side of one flat colour block


@dataclass(frozen=True)
class RGBProjection:
    weight: Tensor  # (3, c) float32, CPU
    bias: Tensor  # (3,)

    def __call__(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(c, h, w)`` -> an RGB image ``(h, w, 3)`` uint8 on the CPU."""
        z = latents.detach().float().cpu().movedim(0, -1)  # (h, w, c)
        rgb = F.linear(z, self.weight, self.bias)  # (h, w, 3) in ~[0, 1]
        return (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def block_images(n: int, cells: int, factor: int, *, seed: int) -> Tensor:
    """``n`` images ``(n, 3, cells * factor, cells * factor)`` in [-1, 1] of random flat colour blocks, each
    ``BLOCK * factor`` pixels wide, so that every latent pixel covers one colour."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, cells // BLOCK, cells // BLOCK, generator=g)  # (n, 3, cells/BLOCK, cells/BLOCK)
    return F.interpolate(colours, scale_factor=BLOCK * factor, mode="nearest") * 2.0 - 1.0  # (n, 3, H, W)


@torch.no_grad()
def fit_rgb_projection(decoder: DecoderAdapter, *, seed: int = 0) -> RGBProjection:
    """Least-squares ``rgb ~ weight @ z + bias`` over the latent pixels of encoded colour-block images."""
    f = decoder.spatial_factor
    images = block_images(FIT_IMAGES, FIT_CELLS, f, seed=seed)  # (n, 3, H, W) in [-1, 1]
    z = decoder.encode(images).float().cpu()  # (n, c, cells, cells)
    rgb = F.avg_pool2d((images + 1.0) / 2.0, f)  # (n, 3, cells, cells): the colour each latent pixel covers
    a = torch.cat([z.movedim(1, -1).reshape(-1, z.shape[1]), torch.ones(z[:, 0].numel(), 1)], dim=1)  # (N, c+1)
    y = rgb.movedim(1, -1).reshape(-1, 3)  # (N, 3)
    solution = torch.linalg.lstsq(a.double(), y.double()).solution.float()  # (c+1, 3)
    return RGBProjection(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())


_fitted: weakref.WeakKeyDictionary[DecoderAdapter, RGBProjection] = weakref.WeakKeyDictionary()


def rgb_projection(decoder: DecoderAdapter) -> RGBProjection:
    """The decoder's fitted projection, computed on first use and kept as long as the decoder lives (its VAE never
    changes: it is frozen)."""
    if decoder not in _fitted:
        _fitted[decoder] = fit_rgb_projection(decoder)
    return _fitted[decoder]
