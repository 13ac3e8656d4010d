"""Tiny MLLMs of the real transformers classes, written as Hugging Face folders so that the adapters load them from
disk exactly as they load real weights. Presets are data (one builder per family), never downloaded."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..file_modes import apply_umask_to_writes
from . import templates
from .tokenizer import train_bpe_tokenizer

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# the tokenizer attributes InternVL's processor reads (`tokenizer.start_image_token` ...), as the -hf folders set them
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


@dataclass(frozen=True)
class TinySize:
    width: int = 64  # text hidden size
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_width: int = 32
    vision_layers: int = 2
    patch: int = 4  # vision patch size; Qwen merges 2x2 patches, so the image grid unit is 2 * patch
    vocab_size: int = 512


def _text_config(size: TinySize, vocab: int, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=size.width,
        intermediate_size=size.width * 2,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        **extra,
    )


def _chat_tokenizer(
    specials: list[str], template: str, size: TinySize, texts: Iterable[str], extra: dict[str, Any] | None = None
) -> Any:
    """Every tiny family speaks ChatML: <|endoftext|> pads, <|im_end|> ends a turn."""
    return train_bpe_tokenizer(
        special_tokens=specials,
        texts=texts,
        vocab_size=size.vocab_size,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=template,
        extra=extra,
    )


def _ids(tok: Any, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary frequencies per (time, height, width) for a head of `head_dim`: upstream's [16, 24, 24] of 128, scaled.
    They must add up to head_dim / 2, which takes a head size that is a multiple of 16 (`check_tiny_size`)."""
    return [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]


def _qwen_vl(size: TinySize, texts: Iterable[str], v25: bool) -> tuple[torch.nn.Module, Any, Any]:
    tok = _chat_tokenizer(QWEN_SPECIALS, templates.QWEN_VL, size, texts)
    pad, eos, image, video, vstart = _ids(
        tok, "<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>"
    )
    mrope = _mrope_section(size.width // size.heads)
    text = _text_config(
        size, len(tok), rope_scaling={"type": "mrope", "mrope_section": mrope}, bos_token_id=pad, eos_token_id=eos
    )
    common = dict(
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=vstart,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if v25:
        vision = dict(
            depth=size.vision_layers,
            hidden_size=size.vision_width,
            intermediate_size=size.vision_width * 2,
            num_heads=2,
            out_hidden_size=size.width,
            patch_size=size.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[size.vision_layers - 1],
            window_size=size.patch * 4,
        )
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common))
    else:
        vision = dict(
            depth=size.vision_layers,
            embed_dim=size.vision_width,
            hidden_size=size.width,
            num_heads=2,
            mlp_ratio=2,
            patch_size=size.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **common))
    unit = size.patch * 2
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * unit * 4, "longest_edge": unit * unit * 64},
        patch_size=size.patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, tok, image_processor


def _vision_config(size: TinySize, tile: int, **extra: Any) -> dict[str, Any]:
    """A tiny ViT on square tiles of `tile` pixels (LLaVA-OV's SigLIP, InternVL's InternViT)."""
    return dict(
        hidden_size=size.vision_width,
        intermediate_size=size.vision_width * 2,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=tile,
        patch_size=size.patch,
        **extra,
    )


def _llava_onevision(size: TinySize, texts: Iterable[str]) -> tuple[torch.nn.Module, Any, Any]:
    tok = _chat_tokenizer(LLAVA_SPECIALS, templates.LLAVA_ONEVISION, size, texts)
    pad, eos, image, video = _ids(tok, "<|endoftext|>", "<|im_end|>", "<image>", "<video>")
    tile = size.patch * 4  # SigLIP tile side: 4x4 patches
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text_config(size, len(tok), bos_token_id=pad, eos_token_id=eos)},
        vision_config=_vision_config(size, tile, model_type="siglip_vision_model"),
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=pad,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        do_pad=True,
    )
    return model, tok, image_processor


def _internvl(size: TinySize, texts: Iterable[str]) -> tuple[torch.nn.Module, Any, Any]:
    """InternVL3 in its transformers-native form: an InternViT tower on square tiles, 2x2 pixel shuffle, a Qwen2 LM."""
    extra = {"extra_special_tokens": INTERNVL_NAMED_TOKENS}
    tok = _chat_tokenizer(INTERNVL_SPECIALS, templates.INTERNVL, size, texts, extra)
    pad, eos, context = _ids(tok, "<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")
    tile = size.patch * 4  # 4x4 patches per tile, pixel-shuffled to 2x2 tokens
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **_text_config(size, len(tok), bos_token_id=pad, eos_token_id=eos)},
        vision_config=_vision_config(size, tile),
        image_token_id=context,
        image_seq_length=(tile // size.patch) ** 2 // 4,  # tokens per tile (the processor's setting upstream)
        downsample_ratio=0.5,
        pad_token_id=pad,
    )
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        max_patches=4,  # upstream: 12 tiles of 448
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return model, tok, image_processor


def _text_lm(size: TinySize, texts: Iterable[str], qwen3: bool) -> tuple[torch.nn.Module, Any, None]:
    tok = _chat_tokenizer(QWEN_SPECIALS[:3], templates.CHATML, size, texts)
    pad, eos = _ids(tok, "<|endoftext|>", "<|im_end|>")
    kwargs = _text_config(size, len(tok), bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    if qwen3:
        return Qwen3ForCausalLM(Qwen3Config(head_dim=size.width // size.heads, **kwargs)), tok, None
    return Qwen2ForCausalLM(Qwen2Config(**kwargs)), tok, None


TINY_MLLMS: dict[str, Callable[[TinySize, Iterable[str]], tuple[torch.nn.Module, Any, Any]]] = {
    "qwen2_5_vl": lambda s, t: _qwen_vl(s, t, v25=True),
    "qwen2_vl": lambda s, t: _qwen_vl(s, t, v25=False),
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "qwen2": lambda s, t: _text_lm(s, t, qwen3=False),
    "qwen3": lambda s, t: _text_lm(s, t, qwen3=True),
}


def check_tiny_size(family: str, size: TinySize) -> None:
    """Refuse, with the rule it breaks, a family or size the transformers classes cannot be built at (checked before
    any work, not deep inside a model's forward)."""
    if family not in TINY_MLLMS:
        raise ValueError(f"no tiny preset for MLLM family {family!r}; available: {sorted(TINY_MLLMS)}")
    if min(size.width, size.layers, size.heads, size.kv_heads, size.vision_layers, size.patch) < 1:
        raise ValueError(f"every size must be >= 1, got {size}")
    if size.width % size.heads or size.heads % size.kv_heads:
        raise ValueError(
            f"width {size.width} must split evenly into {size.heads} heads, and the heads into {size.kv_heads} "
            "key/value groups"
        )
    head = size.width // size.heads
    if head % 2:
        raise ValueError(
            f"the head size (width {size.width} / {size.heads} heads = {head}) must be even for rotary positions"
        )
    if family in ("qwen2_5_vl", "qwen2_vl") and 2 * sum(_mrope_section(head)) != head:
        raise ValueError(
            f"{family}: the head size (width {size.width} / {size.heads} heads = {head}) must be a multiple of 16 "
            f"for its multimodal rotary sections: use a width that is a multiple of {16 * size.heads}"
        )


def write_tiny_mllm(
    family: str, folder: str | Path, *, size: TinySize = TinySize(), texts: Iterable[str] = (), seed: int = 0
) -> Path:
    """Build a tiny model of `family` (a `config.model_type`) and save model, tokenizer and image processor."""
    check_tiny_size(family, size)
    torch.manual_seed(seed)
    model, tokenizer, image_processor = TINY_MLLMS[family](size, list(texts))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with apply_umask_to_writes(folder):  # save_pretrained writes the weights owner-only
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
    return folder
