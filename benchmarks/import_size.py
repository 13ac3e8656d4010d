"""Time and peak memory of importing a reference-trainer checkpoint at a real recipe's size (run by hand).

    python benchmarks/import_size.py [--depth 24] [--width 2048] [--queries 256] [--vocab 151936] [--keep DIR]

Writes a reference-layout folder of random bf16 tensors with the Qwen2.5-VL-3B + Sana recipe's head shapes (the
connector, the MLLM's embedding table grown by N + 2 rows, and the one Sana tensor the importer reads for the decoder
family; the rest of the MLLM and the decoder are left out: the importer does not read them), then runs
`python -m metaqueries_core.importers.reference` on it in a child process under /usr/bin/time-like accounting and
prints wall time, the child's peak RSS and the sizes of both files. Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def connector_tensors(depth: int, width: int, out_width: int) -> dict[str, torch.Tensor]:
    """The reference connector's tensors (names as its trainer saves them), random bf16."""
    heads, hidden = width // 64, 4 * width
    t = {}
    for i in range(depth):
        p = f"model.connector.0.layers.{i}."
        for name in ("q", "k", "v"):
            t[p + f"self_attn.{name}_proj.weight"] = torch.randn(width, width, dtype=torch.bfloat16) * 0.02
            t[p + f"self_attn.{name}_proj.bias"] = torch.zeros(width, dtype=torch.bfloat16)
        t[p + "self_attn.o_proj.weight"] = torch.randn(width, width, dtype=torch.bfloat16) * 0.02
        for name in ("q_norm", "k_norm"):
            t[p + f"self_attn.{name}.gamma"] = torch.ones(heads, 1, 64, dtype=torch.bfloat16)
        t[p + "mlp.gate_proj.weight"] = torch.randn(hidden, width, dtype=torch.bfloat16) * 0.02
        t[p + "mlp.up_proj.weight"] = torch.randn(hidden, width, dtype=torch.bfloat16) * 0.02
        t[p + "mlp.down_proj.weight"] = torch.randn(width, hidden, dtype=torch.bfloat16) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(width, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(width, dtype=torch.bfloat16)
    t["model.connector.1.weight"] = torch.randn(out_width, width, dtype=torch.bfloat16) * 0.02
    t["model.connector.1.bias"] = torch.zeros(out_width, dtype=torch.bfloat16)
    t["model.connector.3.weight"] = torch.randn(out_width, out_width, dtype=torch.bfloat16) * 0.02
    t["model.connector.3.bias"] = torch.zeros(out_width, dtype=torch.bfloat16)
    t["model.connector.4.weight"] = torch.ones(out_width, dtype=torch.bfloat16)
    return t


def write_folder(folder: Path, args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = args.vocab + args.queries + 2
    tensors = {
        "model.mllm_backbone.model.language_model.embed_tokens.weight": torch.randn(rows, args.width).bfloat16(),
        "model.mllm_backbone.model.visual.blocks.0.mlp.gate_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16),
        "model.transformer.caption_projection.linear_1.weight": torch.zeros(8, 2304, dtype=torch.bfloat16),
        **connector_tensors(args.depth, args.width, 2304),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "metaquery",
        "num_metaqueries": args.queries,
        "connector_num_hidden_layers": args.depth,
        "modules_to_freeze": ["vae", "model.mllm_backbone", "model.transformer"],
    }
    (folder / "config.json").write_text(json.dumps(config))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        source, out = root / "checkpoint-1", root / "imported.safetensors"
        start = time.perf_counter()
        write_folder(source, args)
        print(f"wrote the source folder in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "metaqueries_core.importers.reference", str(source), str(out), "--overwrite"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(done.stdout.strip() or done.stderr.strip())
        if done.returncode:
            return done.returncode
        src_gb = (source / "model.safetensors").stat().st_size / 1e9
        print(
            f"import: {wall:.1f} s wall, child peak RSS {peak_mb:.0f} MB; source {src_gb:.2f} GB, "
            f"imported {out.stat().st_size / 1e9:.2f} GB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
