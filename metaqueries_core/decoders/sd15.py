"""Stable Diffusion 1.x/2.x decoder: ``UNet2DConditionModel`` (epsilon or v-prediction) + ``AutoencoderKL``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from .base import DecoderAdapter, PathLike, check_model_folder, load_component, read_json, scheduler_from_config

PREDICTION_TYPES = ("epsilon", "v_prediction")

# Stable Diffusion's training noise schedule; used under whatever the folder's scheduler config says.
SD_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # from_single_file loads float32; passing torch_dtype=float32 anyway only triggers a spurious diffusers warning
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


class SD15Adapter(DecoderAdapter):
    """SD1.5-style UNet + KL VAE; ``prediction_type`` comes from the scheduler config unless overridden."""

    family = "sd15"
    denoiser_subfolder = "unet"
    scheduler_names = ("dpmpp_2m", "euler", "ddim", "unipc")

    denoiser: UNet2DConditionModel
    vae: AutoencoderKL

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: dict[str, Any] | None = None,
        prediction_type: str | None = None,
        source: Path | None = None,
    ) -> None:
        ucfg, vcfg = unet.config, vae.config
        if ucfg.addition_embed_type is not None:
            raise ValueError(
                f"this UNet has addition_embed_type={ucfg.addition_embed_type!r} (SDXL-style extra conditioning); "
                "only SD1.x/2.x UNets (addition_embed_type=None) are supported"
            )
        if ucfg.in_channels != vcfg.latent_channels:
            raise ValueError(
                f"UNet in_channels {ucfg.in_channels} != VAE latent_channels {vcfg.latent_channels} "
                "(inpainting/depth UNets are not supported); the UNet and VAE must come from the same model"
            )
        cfg = {**SD_SCHEDULER_DEFAULTS, **(scheduler_config or {})}
        prediction_type = prediction_type or cfg["prediction_type"]
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        cfg["prediction_type"] = prediction_type
        super().__init__(
            denoiser=unet,
            vae=vae,
            scheduler_config=cfg,
            prediction_type=prediction_type,
            text_width=ucfg.cross_attention_dim,
            latent_channels=vcfg.latent_channels,
            spatial_factor=2 ** (len(vcfg.block_out_channels) - 1),
            source=source,
        )
        self.noise_scheduler: DDPMScheduler = scheduler_from_config(DDPMScheduler, self.scheduler_config)

    @classmethod
    def from_folder(
        cls,
        path: PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype | None = None,
        variant: str | None = None,
        prediction_type: str | None = None,
    ) -> SD15Adapter:
        """Load ``unet/``, ``vae/`` (and ``scheduler/`` if present) from a local diffusers SD folder.

        ``prediction_type`` ("epsilon" | "v_prediction") overrides the scheduler config's."""
        folder = check_model_folder(path, family=cls.family, denoiser_subfolder=cls.denoiser_subfolder)
        unet = load_component(UNet2DConditionModel, folder, "unet", dtype=dtype, variant=variant)
        vae = load_component(AutoencoderKL, folder, "vae", dtype=vae_dtype or dtype, variant=variant)
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        adapter = cls(
            unet=unet, vae=vae, scheduler_config=scheduler_config, prediction_type=prediction_type, source=folder
        )
        return adapter.to(device=device)

    @classmethod
    def from_single_file(
        cls,
        checkpoint: PathLike,
        *,
        config: PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype | None = None,
        prediction_type: str | None = None,
    ) -> SD15Adapter:
        """Load an original-format SD checkpoint (``.safetensors``/``.ckpt``) using the configs of a local diffusers
        folder ``config`` (``unet/config.json``, ``vae/config.json``, optional ``scheduler/``; no weights needed)."""
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"single-file checkpoint {ckpt} does not exist")
        folder = Path(config).expanduser()
        missing = [s for s in ("unet", "vae") if not (folder / s / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(
                f"config folder {folder} lacks {', '.join(f'{m}/config.json' for m in missing)}; a single-file "
                "checkpoint needs a local diffusers folder holding at least unet/config.json and vae/config.json"
            )
        common: dict[str, Any] = {"config": str(folder), "local_files_only": True}
        unet = UNet2DConditionModel.from_single_file(str(ckpt), subfolder="unet", **common, **_dtype_kw(dtype))
        vae = AutoencoderKL.from_single_file(str(ckpt), subfolder="vae", **common, **_dtype_kw(vae_dtype or dtype))
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        adapter = cls(
            unet=unet, vae=vae, scheduler_config=scheduler_config, prediction_type=prediction_type, source=ckpt
        )
        return adapter.to(device=device)

    # ---- model --------------------------------------------------------------------------------------------------
    def _vae_encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        dist = self.vae.encode(images).latent_dist
        return dist.mean if generator is None else dist.sample(generator)  # (B, c, H/f, W/f)

    def _denoise(self, latents: Tensor, timestep: Tensor, cond: Tensor, mask: Tensor | None) -> Tensor:
        return self.denoiser(
            latents, timestep, encoder_hidden_states=cond, encoder_attention_mask=mask, return_dict=False
        )[0]  # (B, c, h, w)

    def denoised(self, x_t: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
        """x0 from epsilon or v at the DDPM input ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``, ``a`` = alphas_cumprod at
        the timestep; between integer timesteps (Euler's) sigma = sqrt((1 - a) / a) is interpolated linearly, as the
        Euler scheduler does."""
        a = self.noise_scheduler.alphas_cumprod.double()  # (T,)
        sigmas = ((1.0 - a) / a).sqrt()  # (T,)
        t = torch.as_tensor(timestep).detach().double().cpu().clamp(0, len(a) - 1).reshape(-1)  # (B,) or (1,)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(a) - 1)
        sigma = torch.lerp(sigmas[lo], sigmas[hi], t - lo)  # (B,)
        a_t = (1.0 / (1.0 + sigma**2)).to(x_t).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x_t - (1.0 - a_t).sqrt() * output) / a_t.sqrt()  # (B, c, h, w)
        return a_t.sqrt() * x_t - (1.0 - a_t).sqrt() * output  # v-prediction; (B, c, h, w)

    def training_inputs(self, x0: Tensor, noise: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """t = floor(u * num_train_timesteps); ``x_t`` = DDPM add_noise; target = noise (epsilon) or velocity (v)."""
        if x0.shape != noise.shape or u.shape != (x0.shape[0],):
            raise ValueError(
                f"x0 and noise must share a (B, c, h, w) shape and u must be (B,); got x0 {tuple(x0.shape)}, "
                f"noise {tuple(noise.shape)}, u {tuple(u.shape)}"
            )
        n = self.num_train_timesteps
        t = (u.to(x0.device).double() * n).floor().long().clamp(0, n - 1)  # (B,)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)  # (B, c, h, w)
        if self.prediction_type == "epsilon":
            target = noise  # (B, c, h, w)
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)  # (B, c, h, w)
        return x_t, t, target

    # ---- schedulers ---------------------------------------------------------------------------------------------
    def _scheduler_factories(self) -> dict[str, Callable[[], SchedulerMixin]]:
        cfg = self.scheduler_config  # carries this adapter's prediction_type
        return {
            "dpmpp_2m": lambda: scheduler_from_config(
                DPMSolverMultistepScheduler, cfg, algorithm_type="dpmsolver++", solver_order=2
            ),
            "euler": lambda: scheduler_from_config(EulerDiscreteScheduler, cfg),
            "ddim": lambda: scheduler_from_config(DDIMScheduler, cfg),
            "unipc": lambda: scheduler_from_config(UniPCMultistepScheduler, cfg),
        }
