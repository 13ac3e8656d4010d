"""Sampling previews: the latent-to-RGB map fitted on a decoder's own VAE."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.preview import block_images, fit_rgb_projection, rgb_projection
from metaqueries_core.decoders.tiny import write_tiny_sana


def test_block_images_give_one_colour_per_latent_pixel() -> None:
    images = block_images(2, 8, 4, seed=0)  # (2, 3, 32, 32)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    cells = F.avg_pool2d(images, 4)  # (2, 3, 8, 8)
    torch.testing.assert_close(F.interpolate(cells, scale_factor=4, mode="nearest"), images)
    assert not torch.equal(images, block_images(2, 8, 4, seed=1))


def test_pixel_space_projection_is_exact(tmp_path: Path) -> None:
    """Pixel "latents" are the image in [-1, 1], so the fit must find rgb = 0.5 z + 0.5."""
    decoder = load_decoder(write_tiny_sana(tmp_path / "pixel", pixel_space=True))
    projection = fit_rgb_projection(decoder)
    torch.testing.assert_close(projection.weight, 0.5 * torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(projection.bias, torch.full((3,), 0.5), atol=1e-5, rtol=0)
    z = torch.rand(3, 5, 7) * 2 - 1  # (c, h, w)
    rgb = projection(z)  # (h, w, 3)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == torch.uint8
    assert (rgb.float() - ((z + 1) / 2 * 255).permute(1, 2, 0)).abs().max() <= 0.5 + 1e-3


def test_the_fit_runs_once_per_decoder(tmp_path: Path, monkeypatch) -> None:
    decoder = load_decoder(write_tiny_sana(tmp_path / "sana"))
    calls = []
    original = decoder.encode
    monkeypatch.setattr(decoder, "encode", lambda images: calls.append(images.shape) or original(images))
    first = rgb_projection(decoder)
    assert rgb_projection(decoder) is first and len(calls) == 1
    assert first.weight.shape == (3, decoder.latent_channels) and torch.isfinite(first.weight).all()
    other = load_decoder(write_tiny_sana(tmp_path / "other", seed=1))
    assert not torch.equal(rgb_projection(other).weight, first.weight)
