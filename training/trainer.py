"""The training loop (accelerate): one code path for `pretrain` and `instruct`, CPU to multi-node."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from metaqueries_core.checkpoint import config_for, save_checkpoint
from metaqueries_core.decoders import DecoderAdapter
from metaqueries_core.head import MetaQueryHead
from metaqueries_core.losses import diffusion_loss
from metaqueries_core.mllm import MLLMAdapter

from . import checkpoints
from .batches import ModelBatch, drop_conditions, to_model_batch
from .config import RunConfig
from .config_io import save_config
from .data import iter_batches
from .datasets import open_training_data
from .model_setup import build_head, decoder_export_state, load_models, set_decoder_mode
from .optim import make_optimizer
from .samples import write_sample_grid

log = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Head (+ the denoiser when it trains) behind one forward, so DDP / FSDP see a single module. The frozen MLLM
    and a frozen denoiser are plain attributes: they are not trained, not synchronised, and not checkpointed."""

    def __init__(self, head: MetaQueryHead, mllm: MLLMAdapter, decoder: DecoderAdapter, *, prefix_cache: bool) -> None:
        super().__init__()
        self.head = head
        if any(p.requires_grad for p in decoder.denoiser.parameters()):
            self.denoiser = decoder.denoiser
        self._mllm, self._decoder, self._prefix_cache = mllm, decoder, prefix_cache

    def forward(self, batch, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond, mask = self.head.condition(self._mllm, batch, prefix_cache=self._prefix_cache)  # (B, N, C)
        return diffusion_loss(self._decoder, x0, cond, mask, u=u, noise=noise)


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """Randomness of one micro-batch from (seed, step, rank, micro) alone, so a resumed run draws exactly what the
    uninterrupted run drew at the same step."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_accelerator(cfg: RunConfig, out: Path) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    log_with = None if cfg.train.report_to == "none" else cfg.train.report_to
    # the schedule is written in optimizer steps: step it ourselves once per step, not once per process
    return Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=mp,
        log_with=log_with,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
    )


def train(cfg: RunConfig) -> Path:
    """Run the configured stage; returns the path of the exported MetaQuery checkpoint."""
    out = Path(cfg.train.output_dir)
    acc = make_accelerator(cfg, out)
    set_seed(cfg.train.seed)
    mllm, decoder = load_models(cfg.model, acc.device)
    head = build_head(cfg.model, mllm, decoder)
    set_decoder_mode(decoder, cfg.model.decoder_mode, cfg.model.lora_rank)
    head.connector.gradient_checkpointing = cfg.train.gradient_checkpointing
    if cfg.train.gradient_checkpointing and cfg.model.decoder_mode != "frozen":
        decoder.denoiser.enable_gradient_checkpointing()
    step_module = TrainStep(head, mllm, decoder, prefix_cache=cfg.train.prefix_cache)
    roles = {"queries": head.queries, "connector": head.connector}
    if cfg.model.decoder_mode != "frozen":
        roles["decoder"] = decoder.denoiser
    optimizer, scheduler = make_optimizer(roles, cfg.optim, cfg.train.steps)
    step_module, optimizer, scheduler = acc.prepare(step_module, optimizer, scheduler)

    data = open_training_data(cfg, rank=acc.process_index, world_size=acc.num_processes)
    step, epoch, position = 0, 0, 0
    ckpt_root = out / "checkpoints"
    if cfg.train.resume and (latest := checkpoints.latest_checkpoint(ckpt_root)) is not None:
        acc.load_state(str(latest))
        state = checkpoints.read_state(latest)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        log.info("resumed from %s at step %d", latest, step)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if acc.log_with:
            acc.init_trackers("metaqueries")

    batches = iter_batches_from(data, cfg, epoch, position)
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not acc.is_local_main_process, desc=cfg.train.stage)
    t0, seen = time.perf_counter(), 0
    while step < cfg.train.steps:
        for micro in range(cfg.train.grad_accum):
            samples, (epoch, position), skips = next(batches)
            seed = step_seed(cfg.train.seed, step, acc.process_index, micro)
            loss = accumulate(acc, step_module, optimizer, scheduler, to_model_batch(samples), cfg, seed)
            seen += len(samples)
        if not math.isfinite(loss):
            latest = checkpoints.latest_checkpoint(ckpt_root)
            raise FloatingPointError(
                f"loss became {loss} at step {step}; stopping. The last good checkpoint is "
                f"{latest if latest else 'none (no checkpoint was written yet)'}; lower optim.lr or check the data."
            )
        step += 1
        bar.update(1)
        lr = scheduler.get_last_lr()[0]
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = seen * acc.num_processes / (time.perf_counter() - t0)
            record = {"step": step, "loss": loss, "lr": lr, "samples_per_s": rate, **skips}
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
            if acc.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if acc.log_with:
                    acc.log(record, step=step)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            save_training_state(acc, ckpt_root, step, epoch, position, cfg.train.keep_checkpoints)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and acc.is_main_process:
            write_sample_grid(out / "samples" / f"step-{step:08d}.png", mllm, head, decoder, cfg, data)
    bar.close()
    acc.wait_for_everyone()
    export = out / cfg.train.export_name
    if acc.is_main_process:
        if cfg.train.sample_every:
            write_sample_grid(out / "samples" / "final.png", mllm, head, decoder, cfg, data)
        config = config_for(acc.unwrap_model(step_module).head, mllm=mllm, decoder=decoder, stage=cfg.train.stage)
        save_checkpoint(export, head, config, decoder_export_state(decoder, cfg.model.decoder_mode))
        log.info("exported %s", export)
    if acc.log_with:
        acc.end_training()
    return export


def accumulate(acc, step_module, optimizer, scheduler, mb: ModelBatch, cfg: RunConfig, seed: int) -> float:
    """One micro-batch: dropout, encode targets, loss, backward; the optimizer steps when accumulation completes."""
    inner = acc.unwrap_model(step_module)
    mllm, decoder, head = inner._mllm, inner._decoder, inner.head
    prompts, images = drop_conditions(mb.prompts, mb.images, cfg.train, np.random.default_rng(seed))
    batch = head.prepare(mllm, prompts, images)
    with torch.no_grad():
        x0 = decoder.encode(mb.targets.to(acc.device, decoder.dtype))  # (B, c, h, w)
    g = torch.Generator().manual_seed(seed)
    u, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)  # (B,), (B, c, h, w)
    with acc.accumulate(step_module):
        with acc.autocast():
            loss = step_module(batch, x0, u, noise)
        acc.backward(loss)
        if acc.sync_gradients:
            if cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(step_module.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.item()


def iter_batches_from(data, cfg: RunConfig, epoch: int, position: int):
    """Endless batches across epochs; yields (samples, (epoch, position after them), skip metrics)."""
    while True:
        it = data.iter_from(epoch, position)
        for samples in iter_batches(it, cfg.train.batch_size, by_bucket=cfg.data.buckets is not None):
            yield samples, (epoch, it.position), {f"skipped/{k}": v for k, v in data.skips.counts.items()}
        epoch, position = epoch + 1, 0


def save_training_state(acc: Accelerator, root: Path, step: int, epoch: int, position: int, keep: int) -> None:
    """Every process writes its part (RNG states, FSDP shards) into one temp folder; the main process then renames
    it into place. A kill at any point leaves the previous complete checkpoint as the newest."""
    tmp = checkpoints.temp_dir(root, step)
    if acc.is_main_process and tmp.exists():  # a leftover of a killed save
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        checkpoints.publish(root, tmp, step, {"step": step, "epoch": epoch, "position": position}, keep)
    acc.wait_for_everyone()
