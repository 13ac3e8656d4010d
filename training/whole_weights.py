"""Whole-weight copies of what a run trains, for sample grids and the export on the main process.

Under FSDP each process holds only its shards of the trained modules (DTensors). The main process cannot run them
alone: a module whose weights sit in the root FSDP unit fails outside the wrapped forward ("got mixed torch.Tensor and
DTensor", seen on a GPU with a fully fine-tuned Sana), and a wrapped block would all-gather and wait forever for the
other processes. So every process gathers the state dict (`Accelerator.get_state_dict`, a collective) and the main
process builds what it samples with from that: a fresh head, and, when the denoiser trains, the decoder loaded again
from its folder with the gathered weights.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from metaqueries_core.checkpoint import apply_decoder_state
from metaqueries_core.decoders import DecoderAdapter
from metaqueries_core.head import MetaQueryHead

from .config import ModelSection
from .model_setup import decoder_export_state, load_run_decoder


def shards_weights(acc: Accelerator) -> bool:
    """Whether training holds only shards of the trained weights on each process (FSDP)."""
    return acc.distributed_type == DistributedType.FSDP


def state_part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a TrainStep state dict under `prefix` ("head." or "denoiser."), without it."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def whole_head(head: MetaQueryHead, state: dict[str, torch.Tensor]) -> MetaQueryHead:
    """A new head shaped like `head` with the `head.*` weights of a gathered state dict (fp32, on CPU). Built on the
    meta device, as `load_checkpoint` does: a random initialisation would be thrown away (about 30 s on 2 CPU threads
    for the 1.6B-parameter head of the Qwen2.5-VL-3B recipe)."""
    return MetaQueryHead.from_state(
        head.settings(), {k: v.float().cpu() for k, v in state_part(state, "head.").items()}
    )


def sampling_decoder(
    acc: Accelerator, decoder: DecoderAdapter, cfg: ModelSection, state: dict[str, torch.Tensor], device: torch.device
) -> DecoderAdapter:
    """`decoder` itself, unless FSDP shards its trained denoiser: then the decoder folder loaded again with the
    gathered `denoiser.*` weights (LoRA merged), on `device`."""
    if not shards_weights(acc) or cfg.decoder_mode == "frozen":  # a frozen denoiser is not part of the FSDP module
        return decoder
    whole = load_run_decoder(cfg, device)
    apply_decoder_state(whole, decoder_export_state(state_part(state, "denoiser."), cfg.decoder_mode))
    return whole
