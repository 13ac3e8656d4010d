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
    u: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the denoiser's prediction and the adapter's target at uniform random times: x0 (B, c, h, w).

    `u` (B,) and `noise` are drawn from `generator` on the CPU (results independent of the device) unless given.
    """
    if u is None:
        u = torch.rand(x0.shape[0], generator=generator, device="cpu")  # (B,)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device="cpu")  # (B, c, h, w)
    u, noise = u.to(x0.device), noise.to(x0.device, x0.dtype)
    x_t, timestep, target = decoder.training_inputs(x0, noise, u)
    pred = decoder.predict(x_t, timestep, cond, mask)  # (B, c, h, w)
    return F.mse_loss(pred.float(), target.float())
