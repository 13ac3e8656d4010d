"""Write tiny, randomly initialised models under the names the example workflows use, plus their input images.

    python tests/nodes/make_example_models.py OUT_MODELS_DIR [--input-dir DIR] [--no-sd15]

Layout (ComfyUI's models folder):
    LLM/metaqueries-toy-qwen2_5_vl/                tiny Qwen2.5-VL (Hugging Face folder)
    LLM/metaqueries-toy-internvl/                  tiny InternVL3 in its transformers-native form
    diffusers/metaqueries-toy-sana/                tiny Sana (diffusers folder)
    metaqueries/metaqueries-toy.safetensors        random MetaQuery head: that MLLM -> that Sana
    metaqueries/metaqueries-toy-openuni.pth        random head saved as OpenUni saves its models: the InternVL ->
                                                   that Sana (Load MetaQuery Checkpoint imports it as it loads)
    checkpoints/metaqueries-toy-sd15.safetensors   SD1.5 single file for core CheckpointLoaderSimple
    metaqueries/metaqueries-toy-sd15.safetensors   random MetaQuery head: that MLLM -> 768-wide SD1.5 conditioning
    extra_model_paths.yaml                         registers this folder's LLM/, metaqueries/, diffusers/ and
                                                   checkpoints/ with ComfyUI (metaqueries_core.comfy_files)

Nothing is downloaded; the images they make are noise. Core ComfyUI recognises an SD1.5 checkpoint by its UNet's
layout (model_channels 320, context_dim 768) and always builds the full SD VAE, so that file keeps those widths
with a 2-level UNet (80M parameters) next to the real-size VAE (84M), stored in fp16 (about 310 MB). `--input-dir` also writes the toy-world images the
workflows' LoadImage nodes name (`metaqueries_core.comfy_files`, which the toy job's export uses too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, "") and __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from metaqueries_core.checkpoint import MetaQueryConfig, save_checkpoint
from metaqueries_core.comfy_files import write_example_inputs, write_extra_model_paths
from metaqueries_core.connector import SANA_OUT_NORM_SCALE, ConnectorConfig
from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.tiny import write_sd15_single_file, write_tiny_sana
from metaqueries_core.file_modes import apply_umask
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.importers import openuni as openuni_format
from metaqueries_core.mllm import load_mllm
from metaqueries_core.tinykit import write_tiny_mllm
from metaqueries_core.toyworld import all_text

MLLM_NAME = "metaqueries-toy-qwen2_5_vl"
INTERNVL_NAME = "metaqueries-toy-internvl"
OPENUNI_NAME = "metaqueries-toy-openuni.pth"  # OpenUni's own format: Load MetaQuery imports it
SANA_NAME = "metaqueries-toy-sana"
CHECKPOINT_NAME = "metaqueries-toy.safetensors"
SD15_NAME = "metaqueries-toy-sd15.safetensors"  # both the core checkpoint and the MetaQuery checkpoint for it
SD15_TEXT_WIDTH = 768
# what the registered folder keys are called (each maps the subfolder of the same name)
FOLDER_KEYS = ("LLM", "metaqueries", "diffusers", "checkpoints")


def write_checkpoint(
    path: Path,
    *,
    mllm_family: str,
    mllm_width: int,
    decoder_family: str,
    decoder_text_width: int,
    num_queries: int = 8,
    depth: int = 1,
    seed: int = 0,
    mllm_name: str = "",
    decoder_name: str = "",
) -> Path:
    """A randomly initialised MetaQuery head for an MLLM of this family and width and a decoder of this family and
    text width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        connector = ConnectorConfig(
            in_width=mllm_width,
            out_width=decoder_text_width,
            depth=depth,
            init_std=0.05,
            out_norm_scale=SANA_OUT_NORM_SCALE if decoder_family == "sana" else 1.0,
        )
        head = MetaQueryHead(num_queries=num_queries, connector=connector)
    config = MetaQueryConfig(
        mllm_family=mllm_family,
        mllm_width=mllm_width,
        decoder_family=decoder_family,
        decoder_text_width=decoder_text_width,
        mllm_name=mllm_name,
        decoder_name=decoder_name,
        **head.settings(),
    )
    return save_checkpoint(path, head, config)


def write_openuni_pth(path: Path, *, mllm_width: int, text_width: int, num_queries: int = 8, seed: int = 0) -> Path:
    """A random head saved as OpenUni saves its model (`meta_queries`, `connector.layers.*`, `projector`, bf16), for
    Load MetaQuery Checkpoint to import as it loads."""
    layout = dict(layer_style="siglip", pos_embed="none", qk_norm=False, final_norm=False, projection="linear")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        connector = ConnectorConfig(in_width=mllm_width, out_width=text_width, depth=1, init_std=0.05, **layout)
        head = MetaQueryHead(num_queries=num_queries, connector=connector)
    state = {"meta_queries": head.queries.queries}
    for key, tensor in head.connector.state_dict().items():
        for theirs, ours in openuni_format.LAYER_RENAMES:
            key = key.replace(ours, theirs)
        state[key.replace("proj.", "projector.") if key.startswith("proj.") else f"connector.{key}"] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to(torch.bfloat16) for k, v in state.items()}, path)
    return path


def write_core_sd15_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """An SD1.5-layout single-file checkpoint (UNet + VAE, no text encoder) that core ComfyUI loads as SD1.5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(320, 640),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=SD15_TEXT_WIDTH,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(  # SD's own VAE layout: core ComfyUI always builds this one for SD1.x checkpoints
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=64,
        )
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(Path(tmp) / "unet")
        vae.save_pretrained(Path(tmp) / "vae")
        write_sd15_single_file(path, folder=tmp)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(state, str(path))
    return apply_umask(path)  # save_file makes it owner-only; ComfyUI may run as another user


def write_example_models(models_dir: Path, *, sd15: bool = True) -> list[Path]:
    mllm_dir = write_tiny_mllm("qwen2_5_vl", models_dir / "LLM" / MLLM_NAME, texts=all_text())
    sana_dir = write_tiny_sana(models_dir / "diffusers" / SANA_NAME)
    mllm = load_mllm(mllm_dir)
    sana = load_decoder(sana_dir)
    written = [mllm_dir, sana_dir]
    common = dict(mllm_family=mllm.model.config.model_type, mllm_width=mllm.width, mllm_name=MLLM_NAME)
    written.append(
        write_checkpoint(
            models_dir / "metaqueries" / CHECKPOINT_NAME,
            decoder_family="sana",
            decoder_text_width=sana.text_width,
            decoder_name=SANA_NAME,
            **common,
        )
    )
    if sd15:
        written.append(write_core_sd15_checkpoint(models_dir / "checkpoints" / SD15_NAME))
        written.append(
            write_checkpoint(
                models_dir / "metaqueries" / SD15_NAME,
                decoder_family="sd15",
                decoder_text_width=SD15_TEXT_WIDTH,
                decoder_name=SD15_NAME,
                **common,
            )
        )
    internvl_dir = write_tiny_mllm("internvl", models_dir / "LLM" / INTERNVL_NAME, texts=all_text())
    written.append(internvl_dir)
    openuni = models_dir / "metaqueries" / OPENUNI_NAME
    written.append(write_openuni_pth(openuni, mllm_width=load_mllm(internvl_dir).width, text_width=sana.text_width))
    written.append(write_extra_model_paths(models_dir, FOLDER_KEYS, "metaqueries_examples"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", type=Path, help="folder laid out like ComfyUI/models (created if missing)")
    parser.add_argument("--input-dir", type=Path, help="also write the workflows' input images here")
    parser.add_argument("--no-sd15", action="store_true", help="skip the ~310 MB SD1.5 checkpoint")
    args = parser.parse_args(argv)
    for path in write_example_models(args.models_dir, sd15=not args.no_sd15):
        print(path)
    if args.input_dir is not None:
        for path in write_example_inputs(args.input_dir):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
