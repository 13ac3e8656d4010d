"""What every importer does last: build the head its config describes, fill it with the imported tensors (strictly),
and write the checkpoint; and the one-line summary its command prints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import MetaQueryConfig, save_checkpoint
from ..head import MetaQueryHead


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; choose another path or allow overwriting")


def write_imported(
    out: Path,
    config: MetaQueryConfig,
    head_state: dict[str, torch.Tensor],
    decoder_state: dict[str, torch.Tensor] | None,
) -> Path:
    """`head_state`: the head's state dict (queries.queries, queries.lead, connector.*), any float dtype."""
    with torch.device("meta"):
        head = MetaQueryHead(**config.head_settings())
    state = {k: v.float() for k, v in head_state.items()}
    missing, unexpected = head.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        c = config.connector
        raise ValueError(
            f"the imported tensors do not fit a {c.depth}-layer {c.layer_style!r} head: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    return save_checkpoint(out, head, config, decoder_state)


def summary(out: str, config: MetaQueryConfig) -> str:
    """What an importer wrote, in one paragraph (the decoder tensors counted from the file's keys, not loaded)."""
    with safe_open(out, framework="pt") as f:
        decoder_tensors = sum(k.startswith("decoder.") for k in f.keys())
    c = config.connector
    decoder = f"with {decoder_tensors} fine-tuned decoder tensors" if decoder_tensors else "no decoder weights"
    return (
        f"wrote {out}: {config.num_queries} queries for a {config.mllm_family} MLLM of width {config.mllm_width}, "
        f"connector depth {c.depth} width {c.inner_width} heads {c.num_heads}, {config.decoder_family} decoder "
        f"(text width {config.decoder_text_width}), {decoder}. Load it with the base MLLM "
        f"({config.mllm_name or 'the one it was trained on'}) and decoder "
        f"({config.decoder_name or 'the one it was trained on'}) folders."
    )
