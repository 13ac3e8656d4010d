"""Memory and time of the query pass through the frozen MLLM with and without `train.gradient_checkpointing`.

    python -m benchmarks.mllm_checkpointing [--width 1024] [--layers 4] [--queries 256] [--batch 4]

Measures, for `MLLMAdapter.query_states` + a stand-in loss, the bytes autograd keeps for the backward pass
(`saved_tensors_hooks`, so it is exact and device-independent) and the forward + backward time, with the MLLM's
decoder layers checkpointed or not. A randomly initialised tiny Qwen2.5-VL of the given width (real transformers
classes, MLP 2x the width where the real 3B model has 5.4x), one text prompt of `--prompt-tokens` tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metaqueries_core.connector import ConnectorConfig
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.mllm import load_mllm
from metaqueries_core.tinykit import TinySize, write_tiny_mllm
from metaqueries_core.toyworld import all_text

from .train_step import make_batch


def kept_bytes_and_seconds(mllm, batch, queries: torch.Tensor) -> tuple[int, float]:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        states = mllm.query_states(batch, queries, prefix_cache=True)  # (B, N, D)
    states.square().mean().backward()
    return sum(saved), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    args.image_size = 112  # make_batch's option; text prompts only here
    size = TinySize(width=args.width, layers=args.layers, heads=args.width // 64, kv_heads=max(1, args.width // 512))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_mllm("qwen2_5_vl", Path(tmp) / "m", size=size, texts=all_text(), seed=0)
        mllm = load_mllm(folder, dtype=torch.float32, device="cpu")
    connector = ConnectorConfig(in_width=mllm.width, out_width=256, depth=1)
    head = MetaQueryHead(num_queries=args.queries, connector=connector, max_prompt_tokens=args.prompt_tokens)
    batch = make_batch(mllm, head, args, with_image=False)
    queries = torch.randn(args.queries, mllm.width, requires_grad=True)
    print(
        f"# width {args.width}, layers {args.layers}, N={args.queries}, batch {args.batch}, prompt {batch.prompt_length}"
    )
    print(f"{'checkpointing':<14} {'kept MB':>9} {'MB/layer/sample':>16} {'step s (median)':>16}")
    for on in (False, True):
        mllm.gradient_checkpointing = on
        runs = [kept_bytes_and_seconds(mllm, batch, queries) for _ in range(args.repeats)]
        kept = runs[0][0] / 2**20
        step = statistics.median(s for _, s in runs)
        print(f"{str(on):<14} {kept:9.1f} {kept / args.layers / args.batch:16.2f} {step:16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
