"""`python -m training.make_tiny_models OUT_DIR`: tiny, randomly initialised models in the real folder layouts, for
trying the trainer on a CPU (configs/tiny_pretrain.yaml and configs/tiny_instruct.yaml read them from runs/tiny_models).

Writes OUT_DIR/qwen2_5_vl (a Qwen2.5-VL MLLM, tokenizer trained offline on the toy world's text), OUT_DIR/sana and
OUT_DIR/sd15 (diffusers decoders). Nothing is downloaded; the same seed gives the same weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaqueries_core.decoders.tiny import write_tiny_sana, write_tiny_sd15
from metaqueries_core.tinykit import TINY_MLLMS, write_tiny_mllm
from metaqueries_core.toyworld import all_text


def make_tiny_models(out: Path, *, mllms: list[str], seed: int = 0) -> dict[str, Path]:
    """Write the tiny MLLMs (one folder per family) and both tiny decoders under `out`; returns name -> folder."""
    unknown = sorted(set(mllms) - set(TINY_MLLMS))
    if unknown:
        raise ValueError(f"no tiny preset for MLLM families {unknown}; available: {sorted(TINY_MLLMS)}")
    texts = list(all_text())
    written = {family: write_tiny_mllm(family, out / family, texts=texts, seed=seed) for family in mllms}
    written["sana"] = write_tiny_sana(out / "sana", seed=seed)
    written["sd15"] = write_tiny_sd15(out / "sd15", seed=seed)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.make_tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the models into (e.g. runs/tiny_models)")
    parser.add_argument(
        "--mllm",
        action="append",
        choices=sorted(TINY_MLLMS),
        help="MLLM family to write (repeatable; default: qwen2_5_vl)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"out_dir {str(args.out_dir)!r} is a file; give a folder (it is created when missing)")
    for name, folder in make_tiny_models(args.out_dir, mllms=args.mllm or ["qwen2_5_vl"], seed=args.seed).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
