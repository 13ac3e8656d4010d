"""Build what a run trains: load the frozen MLLM and the decoder, make or load the head, set what trains."""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from metaqueries_core.checkpoint import check_compatible, load_checkpoint
from metaqueries_core.connector import ConnectorConfig
from metaqueries_core.decoders import DecoderAdapter, load_decoder
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.mllm import MLLMAdapter, load_mllm

from .config import ModelSection

log = logging.getLogger(__name__)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_models(cfg: ModelSection, device: torch.device) -> tuple[MLLMAdapter, DecoderAdapter]:
    for key in ("mllm", "decoder"):
        if not getattr(cfg, key):
            raise ValueError(f"model.{key} is empty: give the local folder of the {key.upper()} to train with")
    mllm = load_mllm(cfg.mllm, dtype=_dtype(cfg.mllm_dtype, device), device=device)
    decoder = load_decoder(cfg.decoder, dtype=torch.float32, device=device)
    trainable = [n for n, p in mllm.model.named_parameters() if p.requires_grad]
    if trainable:  # the method's premise: the MLLM's understanding is untouched
        raise RuntimeError(f"the MLLM must be frozen, but {len(trainable)} parameters require grad: {trainable[:3]}")
    return mllm, decoder


def build_head(cfg: ModelSection, mllm: MLLMAdapter, decoder: DecoderAdapter) -> MetaQueryHead:
    """A fresh head, or the one in `init_checkpoint` (checked against the loaded models; its decoder weights are
    applied to the decoder)."""
    if cfg.init_checkpoint:
        config, head, decoder_state = load_checkpoint(cfg.init_checkpoint)
        check_compatible(config, mllm=mllm, decoder=decoder)
        if decoder_state:
            decoder.denoiser.load_state_dict(decoder_state)
        log.info("initialised from %s (stage %s)", cfg.init_checkpoint, config.stage)
        return head.to(mllm.device)
    c = cfg.connector
    scale = c.out_norm_scale
    if scale is None:
        scale = math.sqrt(5.5) if decoder.family == "sana" else 1.0
    connector = ConnectorConfig(
        in_width=mllm.width,
        out_width=decoder.text_width,
        width=c.width,
        depth=c.depth,
        heads=c.heads,
        mlp_ratio=c.mlp_ratio,
        layer_style=c.layer_style,
        pos_embed=c.pos_embed,
        qk_norm=c.qk_norm,
        projection=c.projection,
        out_norm_scale=scale,
        init_std=c.init_std,
    )
    head = MetaQueryHead(
        num_queries=cfg.num_queries,
        connector=connector,
        system_prompt=cfg.system_prompt,
        max_prompt_tokens=cfg.max_prompt_tokens,
    )
    return head.to(mllm.device)


def set_decoder_mode(decoder: DecoderAdapter, mode: str, lora_rank: int) -> None:
    """frozen: nothing of the decoder trains; full: the whole denoiser; lora: low-rank adapters on its attention."""
    if mode == "frozen":
        decoder.denoiser.requires_grad_(False)
    elif mode == "full":
        decoder.denoiser.requires_grad_(True)
    elif mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("model.decoder_mode=lora needs peft: pip install 'comfyui-metaqueries[lora]'") from e
        decoder.denoiser.requires_grad_(False)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        decoder.denoiser = get_peft_model(decoder.denoiser, config)
    else:
        raise ValueError(f"model.decoder_mode {mode!r} not in ['frozen', 'full', 'lora']")


def decoder_export_state(decoder: DecoderAdapter, mode: str) -> dict[str, torch.Tensor] | None:
    """Decoder weights for the node checkpoint: none when frozen, merged full weights for LoRA."""
    if mode == "frozen":
        return None
    denoiser: nn.Module = decoder.denoiser
    if mode == "lora":
        denoiser = copy.deepcopy(denoiser).merge_and_unload()
    return {k: v.detach().cpu() for k, v in denoiser.state_dict().items()}
