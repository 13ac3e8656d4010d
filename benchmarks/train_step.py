"""Training-step time of the MetaQuery head through a frozen MLLM: plain full-sequence pass vs prefix KV cache.

    python benchmarks/train_step.py [--device cuda] [--families qwen2_5_vl llava_onevision qwen2] [--repeats 10]

One step = forward + backward of queries + connector through the frozen MLLM (`MLLMAdapter.query_states`, then the
connector, then a stand-in loss on its output); tokenising and the vision tower run once outside the timed region,
because both variants share them. With `prefix_cache`, the prompt (up to `--prompt-tokens` text tokens plus image
tokens) runs once under no_grad into the KV cache and only the N query positions run with autograd, so backward
touches N positions instead of L + N. The models are randomly initialised tiny models of the real transformers
classes (built offline, see metaqueries_core.tinykit) but wider and deeper than the test ones, so that the numbers
mean something; real models have the same sequence lengths and a larger width, so the ratio carries over roughly.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from metaqueries_core.connector import ConnectorConfig
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.mllm import MLLMAdapter, PromptBatch, load_mllm
from metaqueries_core.tinykit import TinySize, write_tiny_mllm
from metaqueries_core.toyworld import all_text

VISION = {"qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl"}


def long_caption(tokens: int, seed: int) -> str:
    """A caption of toy-world phrases, long enough to fill `tokens` tokens (the prompt is truncated to that)."""
    texts = list(all_text())
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(texts), (tokens,), generator=g).tolist()
    return ", ".join(texts[i] for i in picks)  # about 5+ tokens per phrase: comfortably over `tokens`


def make_batch(mllm: MLLMAdapter, head: MetaQueryHead, args: argparse.Namespace, with_image: bool) -> PromptBatch:
    prompts = [long_caption(args.prompt_tokens, seed=i) for i in range(args.batch)]
    images = None
    if with_image:
        side = args.image_size
        images = [[Image.new("RGB", (side, side), (40 * i % 256, 120, 200))] for i in range(args.batch)]
    return head.prepare(mllm, prompts, images)


def one_step(mllm: MLLMAdapter, head: MetaQueryHead, batch: PromptBatch, prefix_cache: bool, bf16: bool) -> float:
    """Seconds of one forward + backward (the gradients are left in `head`)."""
    sync = torch.cuda.synchronize if mllm.device.type == "cuda" else (lambda: None)
    head.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    with torch.autocast(mllm.device.type, dtype=torch.bfloat16, enabled=bf16):
        cond, _ = head.condition(mllm, batch, prefix_cache=prefix_cache)  # (B, N, C)
    cond.float().square().mean().backward()  # stand-in for the diffusion loss: the same graph on the MLLM side
    sync()
    return time.perf_counter() - t0


def grads(head: MetaQueryHead) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])


def bench_family(family: str, root: Path, args: argparse.Namespace) -> list[dict]:
    size = TinySize(width=args.width, layers=args.layers, heads=args.width // 64, kv_heads=max(1, args.width // 128))
    folder = write_tiny_mllm(family, root / family, size=size, texts=all_text(), seed=0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    mllm = load_mllm(folder, dtype=dtype, device=args.device)
    torch.manual_seed(0)
    connector = ConnectorConfig(in_width=mllm.width, out_width=args.out_width, depth=args.connector_depth)
    head = MetaQueryHead(num_queries=args.queries, connector=connector, max_prompt_tokens=args.prompt_tokens)
    head.to(args.device)
    rows = []
    for with_image in [False, True] if family in VISION else [False]:
        batch = make_batch(mllm, head, args, with_image)
        one_step(mllm, head, batch, False, args.bf16)  # also the first warm-up step
        g_full = grads(head)
        one_step(mllm, head, batch, True, args.bf16)
        g_full, g_cached = g_full.float(), grads(head).float()
        rel = float((g_cached - g_full).norm() / g_full.norm())  # elementwise bf16 rounding swamps small entries
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.warmup + args.repeats):
            for prefix_cache in (False, True):  # interleaved, so a change in machine load hits both alike
                t = one_step(mllm, head, batch, prefix_cache, args.bf16)
                if i >= args.warmup:
                    times[prefix_cache].append(t)
        rows.append(
            {
                "family": family,
                "image": with_image,
                "prompt": batch.prompt_length,
                "full_ms": 1000 * statistics.median(times[False]),
                "cached_ms": 1000 * statistics.median(times[True]),
                "full_min_ms": 1000 * min(times[False]),
                "cached_min_ms": 1000 * min(times[True]),
                "grads_rel_err": rel,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--families", nargs="+", default=["qwen2_5_vl", "llava_onevision", "qwen2"])
    p.add_argument("--width", type=int, default=256, help="MLLM hidden size of the tiny models")
    p.add_argument("--layers", type=int, default=6, help="MLLM decoder layers")
    p.add_argument("--prompt-tokens", type=int, default=256, help="caption tokens (the reference's truncation)")
    p.add_argument("--queries", type=int, default=64, help="N learnable queries (64-256 for Sana, 77 for SD1.5)")
    p.add_argument("--connector-depth", type=int, default=2)
    p.add_argument("--out-width", type=int, default=256, help="decoder text width C")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=112, help="side of the square input image")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="MLLM weights in bf16 and autocast (as on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="hide the prompt-truncation warnings")
    args = p.parse_args(argv)
    if args.quiet:
        logging.getLogger("metaqueries_core").setLevel(logging.ERROR)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# device {args.device} ({where}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# width {args.width}, layers {args.layers}, N={args.queries}, batch {args.batch}, bf16={args.bf16}")
    print("# median (min) ms per forward + backward; speed-up = full / cached of the medians")
    print(f"{'family':<16} {'image':<6} {'prompt':>6} {'full ms':>15} {'cached ms':>15} {'speed-up':>8}  grads")
    tol = 2e-2 if args.bf16 else 1e-5  # |g_cached - g_full| / |g_full|: bf16 carries ~3 significant digits
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for r in bench_family(family, Path(tmp), args):
                ratio = r["full_ms"] / r["cached_ms"]
                full = f"{r['full_ms']:.1f} ({r['full_min_ms']:.1f})"
                cached = f"{r['cached_ms']:.1f} ({r['cached_min_ms']:.1f})"
                print(
                    f"{r['family']:<16} {'yes' if r['image'] else 'no':<6} {r['prompt']:>6} {full:>15} {cached:>15} "
                    f"{ratio:>7.2f}x  {r['grads_rel_err']:.1e} {'ok' if r['grads_rel_err'] < tol else 'DIFFER'}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
