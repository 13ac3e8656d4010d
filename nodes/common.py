"""Types passed between the pack's nodes and the tensor plumbing they share (IMAGE <-> PIL, CONDITIONING)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from metaqueries_core.checkpoint import MetaQueryConfig
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.images import ALPHA_BACKGROUND, tensor_to_pil
from metaqueries_core.memory import cpu_bytes

from . import comfy_env

# Pack-prefixed custom types (ComfyUI matches sockets by these strings).
MLLM = "MQ_MLLM"
CHECKPOINT = "MQ_CHECKPOINT"
DECODER = "MQ_DECODER"
QUERY_STATES = "MQ_QUERY_STATES"

CATEGORY = "MetaQueries"


@dataclass(frozen=True)
class MetaQueryCheckpoint:
    """What `Load MetaQuery Checkpoint` outputs: the config, the head and the decoder weights trained with it."""

    name: str
    path: Path
    config: MetaQueryConfig
    head: MetaQueryHead
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.head.queries.queries.device

    def get_ram_usage(self) -> int:
        """Host memory of the head and the decoder weights (ComfyUI's RAM cache weighs cached outputs by it)."""
        return cpu_bytes((self.head,), tuple(self.decoder_state.values()))

    @property
    def dtype(self) -> torch.dtype:
        return self.head.queries.queries.dtype


@dataclass(frozen=True)
class QueryStates:
    """MLLM last-layer states at the query positions, (B, N, D), and the checkpoint whose connector maps them."""

    states: torch.Tensor  # (B, N, D)
    checkpoint: MetaQueryCheckpoint


def tip(text: str, **options: Any) -> dict[str, Any]:
    """An input's options dict; every input of the pack carries a tooltip."""
    return {"tooltip": text, **options}


def image_to_pil(image: torch.Tensor, name: str = "image") -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> B RGB PIL images; raises on an empty or malformed batch."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be a ComfyUI IMAGE (B, H, W, C) with C in 1, 3, 4; got shape {tuple(image.shape)}"
        )
    if image.shape[0] == 0:
        raise ValueError(f"{name} is an empty image batch (0 images); connect at least one image")
    rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)  # (B, H, W, 3)
    if image.shape[-1] == 4:  # composited on the background every RGBA image gets (images.to_rgb), as in training
        alpha = image[..., 3:]  # (B, H, W, 1)
        background = torch.tensor(ALPHA_BACKGROUND, dtype=rgb.dtype, device=rgb.device) / 255  # (3,)
        rgb = rgb * alpha + background * (1 - alpha)
    return tensor_to_pil(rgb.permute(0, 3, 1, 2))  # (B, 3, H, W) -> PIL


def decoded_to_image(images: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, 3) float32 on the intermediate device."""
    return images.permute(0, 2, 3, 1).float().contiguous().to(comfy_env.intermediate_device())  # (B, H, W, 3)


def image_lists(images: dict[str, torch.Tensor]) -> list[list[Image.Image]]:
    """Named IMAGE batches -> one list of images per sample. Batches of 1 are shared by every sample; other batch
    sizes must agree (sample i takes image i of each input)."""
    pils = {name: image_to_pil(image, name) for name, image in images.items()}
    sizes = {name: len(p) for name, p in pils.items()}
    batch = max(sizes.values())
    wrong = {name: n for name, n in sizes.items() if n not in (1, batch)}
    if wrong:
        raise ValueError(f"image batch sizes {sizes} disagree; each input must hold 1 image or the same number")
    return [[p[i if len(p) > 1 else 0] for p in pils.values()] for i in range(batch)]


def to_conditioning(
    cond: torch.Tensor, mask: torch.Tensor | None = None, checkpoint: MetaQueryCheckpoint | None = None
) -> list[list[Any]]:
    """cond (B, T, C) -> ComfyUI CONDITIONING [[cond, {}]] on the intermediate device.

    The dict stays empty unless some token is masked (ComfyUI's SD1.x model reads only the tensor, the pooled output
    is for SDXL-style models, and a MetaQuery mask is all ones: every query is a real token) or `checkpoint`
    fine-tuned its decoder: then it names the checkpoint, so Diffusion Sample can refuse a decoder without its
    weights."""
    extras: dict[str, Any] = {}
    device = comfy_env.intermediate_device()
    if mask is not None and not bool(mask.all()):
        extras["attention_mask"] = mask.to(device)
    if checkpoint is not None and checkpoint.decoder_state:
        extras[DECODER_WEIGHTS_KEY] = checkpoint.name
    return [[cond.float().to(device), extras]]


# The checkpoint whose fine-tuned decoder weights a conditioning needs (absent: the decoder folder's own weights).
DECODER_WEIGHTS_KEY = "metaqueries_decoder_weights"
# What Diffusion Sample reads from a conditioning entry's dict; pooled_output is SDXL-style and unused by both
# decoders, so "Conditioning Zero Out" and the like still pass.
READ_CONDITIONING_KEYS = {"attention_mask", "pooled_output", DECODER_WEIGHTS_KEY}


def from_conditioning(conditioning: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI CONDITIONING with one entry -> (cond (B, T, C), mask (B, T) or None)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(
            f"{name} must be a CONDITIONING (a non-empty list of [tensor, dict]); got {type(conditioning)}"
        )
    if len(conditioning) != 1:
        raise ValueError(
            f"{name} holds {len(conditioning)} conditioning entries (e.g. from Conditioning Combine); Diffusion Sample "
            "takes exactly one, use core KSampler for combined or area conditioning"
        )
    entry = conditioning[0]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0]) and entry[0].ndim == 3):
        raise ValueError(f"{name} must be [[tensor (B, T, C), dict]]; got an entry of type {type(entry)}")
    cond, extras = entry
    if ignored := sorted(set(extras) - READ_CONDITIONING_KEYS):
        raise ValueError(
            f"{name} carries {ignored}, which Diffusion Sample does not apply (it reads the tensor and "
            f"attention_mask only); remove the node that set them, or sample SD1.5 conditioning with core KSampler"
        )
    mask = extras.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(cond.shape[:2]):
        raise ValueError(f"{name}: attention_mask {tuple(mask.shape)} does not match cond {tuple(cond.shape)}")
    return cond, mask
