"""The toy job's DC-AE stage: it learns to reconstruct, scales its latents to unit variance, and drops into a Sana
decoder folder that loads through the same path as real weights."""

from __future__ import annotations

import math

import pytest
import torch

from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.tiny import write_tiny_sana
from metaqueries_core.toyworld import ToyWorld
from training.toy.autoencoder import AutoencoderConfig, reconstruction_accuracy, train_autoencoder, world_images

SMALL = AutoencoderConfig(channels=(8, 16, 16), latent_channels=4, steps=40, batch_size=8, lr=4e-3)


@pytest.fixture(scope="module")
def trained():
    world = ToyWorld(size=32, seed=0)
    return world, *train_autoencoder(world, SMALL)


def test_training_lowers_the_loss_and_freezes(trained):
    _, ae, losses = trained
    assert len(losses) == SMALL.steps
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training


def test_scaled_latents_have_unit_std_and_factor_four(trained):
    world, ae, _ = trained
    x, _ = world_images(world, "eval_seen", 0, 64)  # (64, 3, 32, 32)
    z = ae.encode(x).latent  # (64, 4, 8, 8)
    assert z.shape == (64, 4, 8, 8)
    assert abs((z * ae.config.scaling_factor).std().item() - 1.0) < 0.15


def test_reconstruction_accuracy_is_a_share_and_scores_the_identity_perfectly(trained, monkeypatch):
    world, ae, _ = trained
    acc = reconstruction_accuracy(ae, world, "eval_seen", n=16)
    assert 0.0 <= acc <= 1.0
    # a perfect autoencoder must score 1.0: the scorer reads ground-truth images as their captions
    monkeypatch.setattr(ae, "decode", lambda z: type("Out", (), {"sample": z})())
    monkeypatch.setattr(ae, "encode", lambda x: type("Out", (), {"latent": x})())
    assert reconstruction_accuracy(ae, world, "eval_seen", n=16) == 1.0


def test_trained_autoencoder_becomes_the_decoder_folders_vae(trained, tmp_path):
    _, ae, _ = trained
    folder = write_tiny_sana(tmp_path / "dec", caption_channels=32, sample_size=8, vae=ae, interpolation_scale=1.0)
    decoder = load_decoder(folder)
    assert decoder.latent_channels == 4 and decoder.spatial_factor == 4
    assert decoder.vae.config.scaling_factor == pytest.approx(ae.config.scaling_factor)
    for name, p in ae.state_dict().items():
        assert torch.equal(decoder.vae.state_dict()[name], p), name
    with pytest.raises(ValueError, match="pixel_space=True has no autoencoder"):
        write_tiny_sana(tmp_path / "bad", pixel_space=True, vae=ae)


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_any_step_count_trains(steps):
    """Short runs (smoke tests, the README's quick check) must work: 20 steps once broke the LR schedule."""
    cfg = AutoencoderConfig(channels=(4, 8), latent_channels=2, steps=steps, batch_size=2)
    _, losses = train_autoencoder(ToyWorld(size=32, seed=0), cfg)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)


def test_bad_autoencoder_config_is_refused():
    with pytest.raises(ValueError, match="channels needs >= 2"):
        AutoencoderConfig(channels=(8,))
    with pytest.raises(ValueError, match="must be >= 1"):
        AutoencoderConfig(steps=0)
