"""Tiny, seeded, randomly initialised decoders written in the real diffusers folder layout (for tests and smoke runs).

``load_decoder(write_tiny_sana(tmp))`` goes through exactly the code path real weights take. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SanaTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from torch import Tensor, nn

from ..file_modes import apply_umask, apply_umask_to_writes
from .base import PathLike

_LDM_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
_LDM_RESNET += (("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_LDM_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _write_model_index(folder: Path, pipeline: str, components: dict[str, str | None]) -> None:
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    for name, cls_name in components.items():
        index[name] = ["diffusers", cls_name] if cls_name else [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _build(seed: int, make: Any) -> nn.Module:
    """``make()`` under a fixed seed, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def write_tiny_sana(
    folder: PathLike,
    *,
    caption_channels: int = 64,
    sample_size: int = 8,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    latent_channels: int = 4,
    vae_block_out_channels: tuple[int, ...] = (8, 8),
    patch_size: int = 1,
    flow_shift: float = 3.0,
    seed: int = 0,
    pixel_space: bool = False,
    interpolation_scale: float | None = None,
    vae: AutoencoderDC | None = None,
) -> Path:
    """Write a tiny Sana decoder (``SanaTransformer2DModel`` + ``AutoencoderDC`` + Sana's DPM++ flow scheduler config).

    The DC-AE downsamples by ``2 ** (len(vae_block_out_channels) - 1)``; images must be multiples of that times
    ``patch_size``. With ``pixel_space`` there is no DC-AE: the transformer denoises RGB (3 channels) directly.
    ``interpolation_scale`` turns on sin-cos position embeddings (released Sana has none and gets position from its
    3x3 convolutions, too weak at a few tokens a side). ``vae`` saves that (trained) DC-AE instead of a random one:
    ``latent_channels`` and ``vae_block_out_channels`` are then read from it. Returns the folder."""
    root = Path(folder)
    if pixel_space and vae is not None:
        raise ValueError("pixel_space=True has no autoencoder; pass vae=None or pixel_space=False")
    if pixel_space:
        latent_channels = 3
    if vae is not None:
        latent_channels = vae.config.latent_channels
    inner = num_attention_heads * attention_head_dim
    transformer = _build(
        seed,
        lambda: SanaTransformer2DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_cross_attention_heads=num_attention_heads,
            cross_attention_head_dim=attention_head_dim,
            cross_attention_dim=inner,  # Sana projects the caption to the inner width before cross-attention
            caption_channels=caption_channels,
            sample_size=sample_size,
            patch_size=patch_size,
            interpolation_scale=interpolation_scale,
        ),
    )
    n = len(vae_block_out_channels)
    vae = (
        vae
        if vae is not None or pixel_space
        else _build(
            seed + 1,
            lambda: AutoencoderDC(
                in_channels=3,
                latent_channels=latent_channels,
                attention_head_dim=2,
                encoder_block_types=("ResBlock",) + ("EfficientViTBlock",) * (n - 1),
                decoder_block_types=("ResBlock",) + ("EfficientViTBlock",) * (n - 1),
                encoder_block_out_channels=tuple(vae_block_out_channels),
                decoder_block_out_channels=tuple(vae_block_out_channels),
                encoder_layers_per_block=(1,) * n,
                decoder_layers_per_block=(1,) * n,
                encoder_qkv_multiscales=((),) + ((5,),) * (n - 1),
                decoder_qkv_multiscales=((),) + ((5,),) * (n - 1),
                downsample_block_type="conv",
                upsample_block_type="interpolate",
                decoder_norm_types="rms_norm",
                decoder_act_fns="silu",
                scaling_factor=0.41407,
            ),
        )
    )
    # Sana's released scheduler config: DPM-Solver++ 2M on flow sigmas.
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        final_sigmas_type="zero",
    )
    root.mkdir(parents=True, exist_ok=True)
    with apply_umask_to_writes(root):  # save_pretrained writes the weights owner-only
        transformer.save_pretrained(root / "transformer")
        if vae is not None:
            vae.save_pretrained(root / "vae")
        scheduler.save_pretrained(root / "scheduler")
    _write_model_index(
        root,
        "SanaPipeline",
        {
            "transformer": "SanaTransformer2DModel",
            "vae": "AutoencoderDC" if vae is not None else None,
            "scheduler": "DPMSolverMultistepScheduler",
            "text_encoder": None,
            "tokenizer": None,
        },
    )
    return root


def _tiny_sd15_models(
    *,
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (8, 16),
    vae_block_out_channels: tuple[int, ...] = (8, 16),
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    seed: int = 0,
) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The tiny SD UNet and KL VAE that ``write_tiny_sd15`` saves (SD1.5 block layout, tiny widths)."""
    n = len(block_out_channels)
    unet = _build(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=norm_num_groups,
        ),
    )
    m = len(vae_block_out_channels)
    vae = _build(
        seed + 1,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * m,
            up_block_types=("UpDecoderBlock2D",) * m,
            block_out_channels=tuple(vae_block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=32,
        ),
    )
    return unet, vae


def write_tiny_sd15(
    folder: PathLike,
    *,
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (8, 16),
    vae_block_out_channels: tuple[int, ...] = (8, 16),
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny SD1.5-layout decoder (``UNet2DConditionModel`` + ``AutoencoderKL`` + SD1.5's PNDM scheduler config).

    The VAE downsamples by ``2 ** (len(vae_block_out_channels) - 1)``. Returns the folder."""
    root = Path(folder)
    unet, vae = _tiny_sd15_models(
        cross_attention_dim=cross_attention_dim,
        block_out_channels=block_out_channels,
        vae_block_out_channels=vae_block_out_channels,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        seed=seed,
    )
    # SD1.5's released scheduler config (scaled-linear betas), with the requested prediction type.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    root.mkdir(parents=True, exist_ok=True)
    with apply_umask_to_writes(root):  # as in write_tiny_sana
        unet.save_pretrained(root / "unet")
        vae.save_pretrained(root / "vae")
        scheduler.save_pretrained(root / "scheduler")
    _write_model_index(
        root,
        "StableDiffusionPipeline",
        {
            "unet": "UNet2DConditionModel",
            "vae": "AutoencoderKL",
            "scheduler": "PNDMScheduler",
            "text_encoder": None,
            "tokenizer": None,
            "safety_checker": None,
            "feature_extractor": None,
        },
    )
    return root


def _unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """Diffusers UNet key -> original (LDM) key; the inverse of diffusers' ``convert_ldm_unet_checkpoint``."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    p, step = key.split("."), config["layers_per_block"] + 1
    if p[0] == "mid_block":
        head, sub, rest = f"middle_block.{2 * int(p[2]) if p[1] == 'resnets' else 1}", p[1], p[3:]
    elif p[2] == "downsamplers":
        return f"input_blocks.{step * (int(p[1]) + 1)}.0.op." + ".".join(p[5:])
    elif p[2] == "upsamplers":
        slot = 2 if "CrossAttn" in config["up_block_types"][int(p[1])] else 1
        return f"output_blocks.{step * int(p[1]) + step - 1}.{slot}.conv." + ".".join(p[5:])
    else:
        idx = step * int(p[1]) + int(p[3]) + (1 if p[0] == "down_blocks" else 0)
        blocks = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
        head, sub, rest = f"{blocks}.{idx}.{0 if p[2] == 'resnets' else 1}", p[2], p[4:]
    tail = ".".join(rest)
    if sub == "resnets":
        for new, old in _LDM_RESNET:
            tail = re.sub(rf"^{new}\.", old + ".", tail)
    return f"{head}.{tail}"


def _vae_item_to_ldm(key: str, value: Tensor, n_up: int) -> tuple[str, Tensor]:
    """Diffusers KL-VAE key/tensor -> original (LDM) key/tensor; the inverse of ``convert_ldm_vae_checkpoint``."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key], value

    def up(m: re.Match[str]) -> str:  # diffusers numbers the decoder's up blocks backwards
        return f"decoder.up.{n_up - 1 - int(m.group(1))}."

    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    k = k.replace("conv_shortcut", "nin_shortcut")
    if ".mid_block.attentions.0." in k:
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        for new, old in _LDM_VAE_ATTN:
            k = k.replace(f".{new}.", f".{old}.")
        if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
            value = value[:, :, None, None]  # (out, in, 1, 1)
    return k, value


def write_sd15_single_file(path: PathLike, *, folder: PathLike) -> Path:
    """Save the UNet + VAE of a diffusers SD folder as one original-format (LDM) ``.safetensors`` checkpoint.

    Used to test ``SD15Adapter.from_single_file`` offline; ``folder`` then serves as its ``config=``."""
    root = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    state: dict[str, Tensor] = {}
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + _unet_key_to_ldm(key, dict(unet.config))] = value.contiguous()
    for key, value in vae.state_dict().items():
        ldm_key, ldm_value = _vae_item_to_ldm(key, value, len(vae.config.up_block_types))
        state["first_stage_model." + ldm_key] = ldm_value.contiguous()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return apply_umask(out)  # save_file makes it owner-only
