"""The training loss, kept apart from the models: the decoder adapter says how to noise and what to predict."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(
    decoder,
    x0: torch.Tensor,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the adapter's target at uniform random times: x0 (B, c, h, w)."""
    b = x0.shape[0]
    u = torch.rand(b, generator=generator, device="cpu").to(x0.device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)  # (B, c, h, w)
    x_t, timestep, target = decoder.training_inputs(x0, noise, u)
    pred = decoder.predict(x_t, timestep, cond, mask)  # (B, c, h, w)
    return F.mse_loss(pred.float(), target.float())
