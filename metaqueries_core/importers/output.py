"""What every importer does last: build the head its config describes, fill it with the imported tensors (strictly),
and write the checkpoint; and the one-line summary its command prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from ..checkpoint import MetaQueryConfig, save_checkpoint
from ..head import MetaQueryHead

DECODER_CHOICES = ("auto", "include", "skip")  # an importer's `decoder`: the fine-tuned decoder's weights
DecoderChoice = Literal["auto", "include", "skip"]


def check_request(out: Path, overwrite: bool, decoder: str, source: Path) -> None:
    """What an importer checks before reading anything: a known `decoder` choice, an output `.safetensors` path
    that is not (inside) the `source`, and no file at `out` unless overwriting was asked for."""
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder {decoder!r} not in {list(DECODER_CHOICES)}")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ValueError(f"the output {str(out)!r} would overwrite or sit inside the checkpoint being imported")
    if out.suffix != ".safetensors":
        raise ValueError(f"the output {str(out)!r} must be a .safetensors file (this pack's checkpoint format)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; choose another path or allow overwriting")


def build_head(config: MetaQueryConfig, head_state: dict[str, torch.Tensor]) -> MetaQueryHead:
    """The head `config` describes holding `head_state` (queries.queries, queries.lead, connector.*) in the source's
    dtype (the reference and OpenUni save bf16: converting would double the file and add nothing; `load_checkpoint`
    casts to the dtype asked for). Strict: a missing or extra tensor is named."""
    try:
        return MetaQueryHead.from_state(config.head_settings(), head_state)
    except ValueError as e:
        c = config.connector
        raise ValueError(f"the imported tensors do not fit a {c.depth}-layer {c.layer_style!r} head: {e}") from e


def write_imported(
    out: Path,
    config: MetaQueryConfig,
    head_state: dict[str, torch.Tensor],
    decoder_state: dict[str, torch.Tensor] | None,
) -> Path:
    return save_checkpoint(out, build_head(config, head_state), config, decoder_state)


def summary(out: str, config: MetaQueryConfig) -> str:
    """What an importer wrote, in one paragraph (the decoder tensors counted from the file's keys, not loaded)."""
    with safe_open(out, framework="pt") as f:
        decoder_tensors = sum(k.startswith("decoder.") for k in f.keys())
    c = config.connector
    decoder = f"with {decoder_tensors} fine-tuned decoder tensors" if decoder_tensors else "no decoder weights"
    return (
        f"wrote {out}: {config.num_queries} queries for MLLM family {config.mllm_family!r} (width "
        f"{config.mllm_width}), "
        f"connector depth {c.depth} width {c.inner_width} heads {c.num_heads}, {config.decoder_family} decoder "
        f"(text width {config.decoder_text_width}), {decoder}. Load it with the base MLLM "
        f"({config.mllm_name or 'the one it was trained on'}) and decoder "
        f"({config.decoder_name or 'the one it was trained on'}) folders."
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def importer_parser(prog: str, description: str, source_help: str) -> argparse.ArgumentParser:
    """The arguments every importer command takes: the source, the output file, --decoder, --stage, --overwrite."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("source", help=source_help)
    parser.add_argument("out", help="the .safetensors file to write (e.g. ComfyUI/models/metaqueries/x.safetensors)")
    parser.add_argument(
        "--decoder",
        choices=DECODER_CHOICES,
        default="auto",
        help="fine-tuned decoder weights: auto = when the source trained them (default); include / skip",
    )
    parser.add_argument("--stage", choices=["pretrain", "instruct"], default="pretrain", help="recorded in the config")
    parser.add_argument("--overwrite", action="store_true", help="replace `out` if it exists")
    return parser


def run_import(convert: Callable[[], MetaQueryConfig], out: str) -> int:
    """Run an importer for a command: the summary and 0, or a one-line error on stderr and 2."""
    try:
        config = convert()
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(out, config))
    return 0
