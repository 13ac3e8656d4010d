"""What trains and what must not: gradients reach queries + connector only; the loss goes down on a fixed batch."""

from __future__ import annotations

import pytest
import torch
from mq_testutil import MLLM_FAMILIES
from PIL import Image

from metaqueries_core.images import pil_to_tensor
from metaqueries_core.losses import diffusion_loss


def target_images(n=4, size=32):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    return pil_to_tensor([Image.new("RGB", (size, size), colours[i % 4]) for i in range(n)]) * 2 - 1  # (B,3,H,W)


@pytest.mark.parametrize("decoder_family", ["sana", "sd15"])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_gradients_reach_only_the_trainable_parts(mllm_loader, decoder_loader, make_head, family, decoder_family):
    mllm, decoder = mllm_loader(family), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    before = {k: v.clone() for k, v in mllm.model.state_dict().items()}
    x0 = decoder.encode(target_images(2))
    cond, mask = head.encode(mllm, ["a red square", "a green square"])
    loss = diffusion_loss(decoder, x0, cond, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert head.queries.queries.grad is not None and head.queries.queries.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.connector.parameters())
    assert all(p.grad is None for p in mllm.model.parameters())
    assert all(not p.requires_grad for p in decoder.vae.parameters())
    after = mllm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    decoder.denoiser.zero_grad(set_to_none=True)


def fit(mllm, decoder, head, params, steps, lr):
    """Train `params` on one fixed batch (fixed noise and times, so the loss is deterministic); -> (start, end)."""
    prompts = ["a red square", "a green square", "a blue square", "a yellow square"]
    x0 = decoder.encode(target_images(4))
    batch = head.prepare(mllm, prompts)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))

    def loss():
        cond, mask = head.condition(mllm, batch, prefix_cache=True)
        return diffusion_loss(decoder, x0, cond, mask, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        start = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        return start, loss().item()


@pytest.mark.parametrize("decoder_family", ["sana", "sd15"])
def test_training_queries_and_connector_lowers_the_loss(mllm_loader, decoder_loader, make_head, decoder_family):
    """Frozen decoder: only the conditioning can move, which bounds how far the loss can fall on a random tiny
    decoder; the drop must still be clear and the frozen decoder untouched."""
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    frozen = {k: v.clone() for k, v in decoder.denoiser.state_dict().items()}
    decoder.denoiser.requires_grad_(False)
    try:
        start, end = fit(mllm, decoder, head, list(head.parameters()), steps=30, lr=1e-2)
    finally:
        decoder.denoiser.requires_grad_(True)
    assert end < 0.95 * start, (start, end)
    assert all(torch.equal(frozen[k], v) for k, v in decoder.denoiser.state_dict().items())


@pytest.mark.parametrize("decoder_family", ["sana", "sd15"])
def test_training_with_the_decoder_fits_a_fixed_batch(mllm_loader, decoder_loader, make_head, decoder_family):
    """Queries + connector + decoder (the reference's Sana recipe) on one batch: the loss at least halves."""
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader(decoder_family)
    head = make_head(mllm, decoder)
    saved = {k: v.clone() for k, v in decoder.denoiser.state_dict().items()}
    try:
        params = list(head.parameters()) + list(decoder.denoiser.parameters())
        start, end = fit(mllm, decoder, head, params, steps=30, lr=3e-3)
    finally:
        decoder.denoiser.load_state_dict(saved)
        decoder.denoiser.zero_grad(set_to_none=True)
    assert end < 0.5 * start, (start, end)
