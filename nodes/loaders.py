"""Loader nodes: the frozen MLLM, a MetaQuery checkpoint and a diffusion decoder, each from the ComfyUI models folders.

ComfyUI caches node outputs, so a loaded model stays in memory while its widgets and its files are unchanged (each
loader's IS_CHANGED is the size and modification time of the model's files); no cache here."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from metaqueries_core.checkpoint import apply_decoder_state, check_compatible, load_checkpoint
from metaqueries_core.decoders import DecoderAdapter, load_decoder
from metaqueries_core.importers.openuni import load_openuni
from metaqueries_core.importers.reference import is_reference_folder, load_reference
from metaqueries_core.mllm import MLLMAdapter, load_mllm

from . import comfy_env
from .common import CATEGORY, CHECKPOINT, DECODER, MLLM, MetaQueryCheckpoint, tip

OPENUNI_SUFFIX = ".pth"  # OpenUni's released checkpoints, imported as they load

log = logging.getLogger(__name__)


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _is_diffusers_folder(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("model_index.json", "transformer/config.json", "unet/config.json"))


def _placement_inputs(what: str) -> dict[str, tuple]:
    return {
        "dtype": (
            list(comfy_env.DTYPES),
            tip(
                f"Precision of the {what}. auto: fp32 on CPU, bf16 on GPUs that support it, else fp16.", default="auto"
            ),
        ),
        "device": (
            list(comfy_env.DEVICES),
            tip(f"Where the {what} runs. auto: the device ComfyUI uses for models.", default="auto"),
        ),
    }


def _placement(dtype: str, device: str) -> tuple[torch.dtype, torch.device]:
    dev = comfy_env.torch_device(device)
    return comfy_env.torch_dtype(dtype, dev), dev


class LoadMLLM:
    DESCRIPTION = (
        "Loads a frozen multimodal LLM (Qwen2.5-VL, Qwen2-VL, LLaVA-OneVision, InternVL3-hf, Qwen2/Qwen3 text) from a "
        "Hugging Face folder under models/LLM/ or models/text_encoders/. The family is read from its config.json."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MLLM,)
    RETURN_NAMES = ("mllm",)
    OUTPUT_TOOLTIPS = ("The frozen MLLM, for MetaQuery Encode, Edit Conditioning and MLLM Describe / Ask.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = comfy_env.list_folders(comfy_env.MLLM_KEYS, _is_hf_folder)
        return {
            "required": {
                "mllm_name": (folders, tip("Hugging Face model folder under models/LLM/ or models/text_encoders/.")),
                **_placement_inputs("MLLM"),
            }
        }

    @classmethod
    def IS_CHANGED(cls, mllm_name: str, **_: object) -> str:
        return comfy_env.fingerprint(comfy_env.MLLM_KEYS, mllm_name)

    def load(self, mllm_name: str, dtype: str, device: str) -> tuple[MLLMAdapter]:
        path = comfy_env.resolve(comfy_env.MLLM_KEYS, mllm_name, "MLLM folder")
        torch_dtype, torch_device = _placement(dtype, device)
        return (load_mllm(path, dtype=torch_dtype, device=torch_device),)


class LoadCheckpoint:
    DESCRIPTION = (
        "Loads a MetaQuery checkpoint (.safetensors under models/metaqueries/): the learnable queries, the connector "
        "and, when the decoder was fine-tuned, its decoder weights (connect this to Load Diffusion Decoder to use them)."
        " An OpenUni .pth there is imported as it loads (for InternVL3 in its -hf form), and so is a checkpoint folder"
        " of the MetaQuery reference trainer (config.json with model_type metaquery; load its base MLLM next to it)."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (CHECKPOINT,)
    RETURN_NAMES = ("checkpoint",)
    OUTPUT_TOOLTIPS = ("Queries + connector, with the checkpoint's config (MLLM and decoder it was trained for).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = comfy_env.list_folders(comfy_env.CHECKPOINT_KEYS, is_reference_folder)
        files = [  # a reference folder's own weight shards are no checkpoints of their own
            n
            for s in (".safetensors", OPENUNI_SUFFIX)
            for n in comfy_env.list_files(comfy_env.CHECKPOINT_KEYS, s)
            if not any(n.startswith(f"{folder}/") for folder in folders)
        ]
        what = (
            "MetaQuery checkpoint (.safetensors) under models/metaqueries/, or one imported on load: an OpenUni .pth, "
            "or a reference trainer checkpoint folder."
        )
        return {
            "required": {
                "checkpoint_name": (sorted(files + folders), tip(what)),
                **_placement_inputs("queries and connector"),
            }
        }

    @classmethod
    def IS_CHANGED(cls, checkpoint_name: str, **_: object) -> str:
        return comfy_env.fingerprint(comfy_env.CHECKPOINT_KEYS, checkpoint_name)

    def load(self, checkpoint_name: str, dtype: str, device: str) -> tuple[MetaQueryCheckpoint]:
        path = comfy_env.resolve(comfy_env.CHECKPOINT_KEYS, checkpoint_name, "MetaQuery checkpoint")
        torch_dtype, torch_device = _placement(dtype, device)
        if path.suffix == OPENUNI_SUFFIX or path.is_dir():
            try:
                config, head, decoder_state = load_openuni(path) if path.is_file() else load_reference(path)
            except (ValueError, KeyError) as e:  # the importers name what is wrong, not always the file
                what = "OpenUni checkpoint" if path.is_file() else "reference trainer checkpoint folder"
                raise ValueError(f"{what} {checkpoint_name!r} cannot be imported: {e}") from e
            head = head.to(device=torch_device, dtype=torch_dtype)
        else:
            config, head, decoder_state = load_checkpoint(path, device=torch_device, dtype=torch_dtype)
        head.eval().requires_grad_(False)
        return (MetaQueryCheckpoint(checkpoint_name, path, config, head, decoder_state),)


class LoadDecoder:
    DESCRIPTION = (
        "Loads a Sana or SD1.5 diffusion decoder from a diffusers folder under models/diffusers/ (the family is read "
        "from its configs). Connect the MetaQuery checkpoint to check that it fits and to apply its fine-tuned "
        "decoder weights, if it has any."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (DECODER,)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("Denoiser + VAE + scheduler config, for Diffusion Sample.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = comfy_env.list_folders(comfy_env.DECODER_KEYS, _is_diffusers_folder)
        return {
            "required": {
                "decoder_name": (
                    folders,
                    tip("Diffusers folder (Sana or Stable Diffusion 1.5) under models/diffusers/."),
                ),
                **_placement_inputs("decoder"),
            },
            "optional": {
                "checkpoint": (
                    CHECKPOINT,
                    tip(
                        "MetaQuery checkpoint: checked against this decoder; its decoder weights, if any, are applied."
                    ),
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, decoder_name: str, **_: object) -> str:
        return comfy_env.fingerprint(comfy_env.DECODER_KEYS, decoder_name)

    def load(
        self, decoder_name: str, dtype: str, device: str, checkpoint: MetaQueryCheckpoint | None = None
    ) -> tuple[DecoderAdapter]:
        path = comfy_env.resolve(comfy_env.DECODER_KEYS, decoder_name, "decoder folder")
        torch_dtype, torch_device = _placement(dtype, device)
        decoder = load_decoder(path, dtype=torch_dtype, device=torch_device)
        decoder.denoiser.eval().requires_grad_(False)
        if checkpoint is not None:
            check_compatible(checkpoint.config, decoder=decoder)
            if checkpoint.decoder_state:
                try:
                    apply_decoder_state(decoder, checkpoint.decoder_state)
                except ValueError as e:
                    trained = checkpoint.config.decoder_name
                    other = f" (it was trained with decoder {trained!r})" if trained and trained != decoder_name else ""
                    raise ValueError(f"{checkpoint.name!r} does not fit decoder {decoder_name!r}{other}: {e}") from e
                decoder.weights_from = checkpoint.name
        return (decoder,)
