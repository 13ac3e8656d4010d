"""Sana decoder: ``SanaTransformer2DModel`` (flow matching) + DC-AE (``AutoencoderDC``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaTransformer2DModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from .base import DecoderAdapter, PathLike, check_model_folder, load_component, read_json, scheduler_from_config
from .pixel import PixelSpace

# Sana's released 1024px checkpoints sample with flow_shift 3.0; used only when the folder has no scheduler config.
DEFAULT_FLOW_SHIFT = 3.0


def shift_sigmas(s: Tensor, shift: float) -> Tensor:
    """The SD3/Sana time shift ``shift * s / (1 + (shift - 1) * s)`` (identity for shift 1)."""
    return s if shift == 1.0 else shift * s / (1.0 + (shift - 1.0) * s)


class FlowEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler with the two members every other sampler has, so one loop drives them all:
    ``init_noise_sigma`` (1.0: flow sampling starts from unit noise) and an identity ``scale_model_input``."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        return sample  # (B, c, h, w)


class SanaAdapter(DecoderAdapter):
    """Sana transformer + DC-AE. Predicts the flow ``noise - x0`` at ``x_t = (1 - s) * x0 + s * noise``."""

    family = "sana"
    denoiser_subfolder = "transformer"
    scheduler_names = ("dpmpp_2m", "euler", "unipc")
    unavailable_reason = "Sana is a flow-matching model and {name!r} is a noise-prediction (DDPM-family) sampler"

    denoiser: SanaTransformer2DModel
    vae: AutoencoderDC | PixelSpace

    def __init__(
        self,
        *,
        transformer: SanaTransformer2DModel,
        vae: AutoencoderDC | PixelSpace,
        scheduler_config: dict[str, Any] | None = None,
        flow_shift: float | None = None,
        train_shift: float = 1.0,
        source: Path | None = None,
    ) -> None:
        tcfg, vcfg = transformer.config, vae.config
        if getattr(tcfg, "guidance_embeds", False):
            raise ValueError(
                "this Sana transformer has guidance_embeds=True (a guidance-distilled, Sana-Sprint style model), "
                "which needs a guidance input; only guidance_embeds=False transformers are supported"
            )
        if tcfg.in_channels != vcfg.latent_channels:
            raise ValueError(
                f"transformer in_channels {tcfg.in_channels} != VAE latent_channels {vcfg.latent_channels}; "
                "the transformer and the DC-AE must come from the same Sana model"
            )
        cfg = dict(scheduler_config or {})
        if flow_shift is None:
            flow_shift = cfg.get("flow_shift", cfg.get("shift", DEFAULT_FLOW_SHIFT))
        if train_shift <= 0:
            raise ValueError(f"train_shift must be > 0 (1.0 = uniform s), got {train_shift}")
        super().__init__(
            denoiser=transformer,
            vae=vae,
            scheduler_config=cfg,
            prediction_type="flow",
            text_width=tcfg.caption_channels,
            latent_channels=vcfg.latent_channels,
            spatial_factor=2 ** (len(vcfg.encoder_block_out_channels) - 1),
            source=source,
        )
        self.patch_size = int(tcfg.patch_size)
        self.flow_shift = float(flow_shift)
        self.train_shift = float(train_shift)

    @classmethod
    def from_folder(
        cls,
        path: PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype | None = None,
        variant: str | None = None,
        flow_shift: float | None = None,
        train_shift: float = 1.0,
    ) -> SanaAdapter:
        """Load ``transformer/``, ``vae/`` (and ``scheduler/`` if present) from a local diffusers Sana folder.

        ``vae_dtype`` defaults to ``dtype``; ``flow_shift`` overrides the sampling shift of the scheduler config;
        ``train_shift`` shifts the training noise levels (1.0 = uniform)."""
        folder = check_model_folder(path, family=cls.family, denoiser_subfolder=cls.denoiser_subfolder)
        transformer = load_component(SanaTransformer2DModel, folder, "transformer", dtype=dtype, variant=variant)
        index = read_json(folder / "model_index.json") or {}
        if not (folder / "vae").is_dir() and index.get("vae") == [None, None]:
            vae = PixelSpace().to(dtype=vae_dtype or dtype)  # a pixel-space model: no autoencoder
        else:
            vae = load_component(AutoencoderDC, folder, "vae", dtype=vae_dtype or dtype, variant=variant)
        adapter = cls(
            transformer=transformer,
            vae=vae,
            scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
            flow_shift=flow_shift,
            train_shift=train_shift,
            source=folder,
        )
        return adapter.to(device=device)

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.spatial_factor * self.patch_size

    def _size_explanation(self) -> str:
        return f"DC-AE factor {self.spatial_factor} x patch size {self.patch_size}"

    def _latent_multiple(self) -> int:
        return self.patch_size

    # ---- model --------------------------------------------------------------------------------------------------
    def _vae_encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.vae.encode(images, return_dict=False)[0]  # (B, c, H/f, W/f); DC-AE is deterministic

    def _denoise(self, latents: Tensor, timestep: Tensor, cond: Tensor, mask: Tensor | None) -> Tensor:
        t = timestep.float() * self.denoiser.config.timestep_scale  # (B,) fp32: the sinusoidal embedding needs it
        out = self.denoiser(
            hidden_states=latents,
            encoder_hidden_states=cond,
            timestep=t,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]  # (B, c or 2c, h, w)
        if out.shape[1] == 2 * self.latent_channels:  # learned-sigma checkpoints: keep the flow half
            out = out[:, : self.latent_channels]  # (B, c, h, w)
        return out

    def denoised(self, x_t: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
        """``x0 = x_t - s * output`` with ``s = timestep / num_train_timesteps`` (the flow is ``noise - x0``)."""
        s = torch.as_tensor(timestep, device=x_t.device, dtype=x_t.dtype) / self.num_train_timesteps  # () or (B,)
        return x_t - s.reshape(-1, 1, 1, 1) * output  # (B, c, h, w)

    def training_inputs(self, x0: Tensor, noise: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """s = shift(u); ``x_t = (1 - s) x0 + s noise``, timestep ``s * num_train_timesteps``, target ``noise - x0``."""
        if x0.shape != noise.shape or u.shape != (x0.shape[0],):
            raise ValueError(
                f"x0 and noise must share a (B, c, h, w) shape and u must be (B,); got x0 {tuple(x0.shape)}, "
                f"noise {tuple(noise.shape)}, u {tuple(u.shape)}"
            )
        s = shift_sigmas(u.to(device=x0.device, dtype=x0.dtype), self.train_shift)  # (B,)
        s4 = s.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x_t = (1.0 - s4) * x0 + s4 * noise  # (B, c, h, w)
        timestep = s * self.num_train_timesteps  # (B,)
        target = noise - x0  # (B, c, h, w)
        return x_t, timestep, target

    # ---- schedulers ---------------------------------------------------------------------------------------------
    def _scheduler_factories(self) -> dict[str, Callable[[], SchedulerMixin]]:
        cfg = self.scheduler_config
        flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": self.flow_shift}
        return {
            "dpmpp_2m": lambda: scheduler_from_config(
                DPMSolverMultistepScheduler, cfg, algorithm_type="dpmsolver++", solver_order=2, **flow
            ),
            "euler": lambda: scheduler_from_config(
                FlowEulerScheduler, cfg, shift=self.flow_shift, use_dynamic_shifting=False
            ),
            "unipc": lambda: scheduler_from_config(UniPCMultistepScheduler, cfg, **flow),
        }
