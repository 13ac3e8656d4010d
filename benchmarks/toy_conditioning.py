"""How well the toy decoder draws from a given kind of conditioning: train only the decoder, score it.

    python -m benchmarks.toy_conditioning --work outputs/toy/work --mode words [--steps 3000] [--out DIR]

Reuses a toy job's fresh decoder (`work/decoder_init`, with its trained autoencoder) and, for the MLLM modes, its
taught MLLM (`work/mllm`). The decoder trains alone (batch 16, lr 2e-3, 10% dropped conditioning, the world's
natural caption mix) on frozen conditioning of one kind, then is scored like the toy job (single-object prompts
and 60 two-object prompts, 2 samples each, guidance 5). Modes, each token a fixed random vector per symbol:

- bound: one token per object, its colour + shape + position vectors summed (an upper bound: binding done for it)
- words / words_noseq: one token per caption word, plus (words) a vector for the word's place in the caption
- states: the MLLM's last-layer states at the query slots (initial queries, as the toy job starts them),
  standardised, plus a vector per slot
- argmax: the word each slot's state predicts through the MLLM's LM head, plus a vector per slot

Results (2026-11-30) are in benchmarks/TOYWORLD.md. Run by hand; one mode takes ~8 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metaqueries_core.decoders import load_decoder
from metaqueries_core.images import pil_to_tensor, tensor_to_pil
from metaqueries_core.losses import diffusion_loss
from metaqueries_core.sampling import Guidance, denoise
from metaqueries_core.toyworld import ToyWorld, score_image, summarise
from metaqueries_core.toyworld.world import COLOURS, POSITIONS, SHAPES, all_text

MODES = ("bound", "words", "words_noseq", "states", "argmax")


class Tokens:
    """Frozen conditioning tokens (T, C) of a (scene, caption) for one mode."""

    def __init__(self, mode: str, width: int, work: Path, texts: list[str], seed: int = 1) -> None:
        self.mode, g = mode, torch.Generator().manual_seed(seed)
        vec = lambda names: {n: torch.randn(width, generator=g) for n in names}  # noqa: E731
        self.colour, self.shape, self.pos = vec(COLOURS), vec(SHAPES), vec([*POSITIONS, "any"])
        self.word = vec(sorted({w for t in all_text() for w in t.replace("?", " ").split()}))
        self.seq = torch.randn(64, width, generator=g)  # (64, C) place in the caption / query slot
        self.null = torch.randn(width, generator=g)
        self.states = self._mllm_tokens(work, texts, width, g) if mode in ("states", "argmax") else {}

    @torch.no_grad()
    def _mllm_tokens(self, work: Path, texts: list[str], width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        from metaqueries_core.connector import ConnectorConfig
        from metaqueries_core.head import MetaQueryHead
        from metaqueries_core.mllm import load_mllm
        from training.model_setup import init_queries_from_text
        from training.toyjob import SYSTEM_PROMPT, ToyJobConfig

        mllm = load_mllm(work / "mllm")
        job = ToyJobConfig()
        cfg = ConnectorConfig(in_width=mllm.width, out_width=width, depth=0)
        head = MetaQueryHead(num_queries=job.num_queries, connector=cfg, system_prompt=SYSTEM_PROMPT)
        init_queries_from_text(head, mllm, job.queries_init_text)
        st = torch.cat([head.states(mllm, head.prepare(mllm, texts[i : i + 256])) for i in range(0, len(texts), 256)])
        if self.mode == "argmax":  # (n, N, D) -> the predicted words' vectors
            vocab = torch.randn(mllm.model.lm_head.weight.shape[0], width, generator=g)  # (V, C)
            st = vocab[mllm.model.lm_head(st).argmax(-1)]  # (n, N, C)
        st = (st - st.mean((0, 1))) / st.std((0, 1))  # (n, N, C)
        return dict(zip(texts, st.float()))

    def __call__(self, scene, text: str) -> list[torch.Tensor]:
        if self.mode == "bound":
            claimed = scene.layout in ("placed", "relation")
            return [
                self.colour[o.colour] + self.shape[o.shape] + self.pos[o.position if claimed else "any"]
                for o in scene.objects
            ]
        if self.mode in ("states", "argmax"):
            return [v + self.seq[i] for i, v in enumerate(self.states[text])]
        seq = self.mode == "words"
        return [self.word[w] + (self.seq[i] if seq else 0) for i, w in enumerate(text.split())]

    def batch(self, items: list[tuple], drop: list[bool] | None = None, length: int = 0):
        """(cond (B, T, C), mask (B, T)); dropped rows hold the null token only."""
        toks = [[self.null] if drop is not None and drop[i] else self(s, t) for i, (s, t) in enumerate(items)]
        t_max = max(length, *(len(t) for t in toks))
        cond, mask = torch.zeros(len(toks), t_max, self.null.shape[0]), torch.zeros(len(toks), t_max)
        for i, t in enumerate(toks):
            cond[i, : len(t)], mask[i, : len(t)] = torch.stack(t), 1
        return cond, mask


def evaluate(dec, tokens: Tokens, world: ToyWorld, kind: str, n: int | None, seeds=(0, 1)) -> dict:
    """`summarise`d scores (overall / seen / heldout) of `len(seeds)` samples per eval prompt of `kind`."""
    prompts = world.eval_prompts(kind, n)
    items = [(p.scene, p.prompt) for p in prompts]
    cond, mask = tokens.batch(items)  # (B, T, C), (B, T)
    null, null_mask = tokens.batch(items, [True] * len(items), length=cond.shape[1])
    results = []
    for seed in seeds:
        lat = denoise(
            dec,
            torch.cat([null, cond]),
            torch.cat([null_mask, mask]),
            branches=2,
            height=world.size,
            width=world.size,
            steps=20,
            guidance=Guidance(5.0, 1.0),
            seed=seed,
        )  # (B, c, h, w)
        images = tensor_to_pil(dec.decode(lat))
        results += [(score_image(im, p.scene), p.heldout) for p, im in zip(prompts, images)]
    return summarise(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a toy job's work folder (decoder_init/, mllm/)")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write scores.json here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dec = load_decoder(args.work / "decoder_init")
    world = ToyWorld(32, 0)
    samples = [world.caption_sample("train", i) for i in range(args.steps * 16)]
    texts = sorted(
        {s.caption for s in samples}
        | {p.prompt for k, n in (("single", None), ("two_object", 60)) for p in world.eval_prompts(k, n)}
    )
    tokens = Tokens(args.mode, dec.text_width, args.work, texts)
    with torch.no_grad():
        x0 = torch.cat(
            [
                dec.encode(pil_to_tensor([s.image for s in samples[i : i + 512]]) * 2 - 1)
                for i in range(0, len(samples), 512)
            ]
        )  # (steps * 16, c, h, w)
    opt = torch.optim.AdamW(dec.denoiser.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(2)
    dec.denoiser.train()
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"decoder from {args.mode}"):
        rows = range(step * 16, step * 16 + 16)
        drop = (torch.rand(16, generator=g) < 0.1).tolist()
        cond, mask = tokens.batch([(samples[i].scene, samples[i].caption) for i in rows], drop)
        loss = diffusion_loss(dec, x0[rows.start : rows.stop], cond, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    dec.denoiser.eval()
    result = {
        "mode": args.mode,
        "steps": args.steps,
        "train_s": round(time.perf_counter() - t0),
        "single": evaluate(dec, tokens, world, "single", None),
        "two_object": evaluate(dec, tokens, world, "two_object", 60),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scores.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
