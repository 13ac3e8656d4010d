"""The training loop (accelerate): one code path for `pretrain` and `instruct`, CPU to multi-node."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, is_tensorboard_available, is_wandb_available, set_seed
from safetensors import SafetensorError
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
from .config_io import config_to_dict, save_config
from .data import Batches, NoUsableSampleError, SampleDataset
from .data.samples import Sample
from .datasets import open_training_data
from .latent_cache import LatentCache, prepare_latent_cache
from .model_setup import (
    build_head,
    checkpoint_has_decoder,
    count_trainable,
    decoder_export_state,
    load_models,
    set_decoder_mode,
)
from .optim import current_rates, make_optimizer, set_base_rates
from .preflight import RUN_FILES, SetupError, TrainingDiverged, check_run
from .resume_check import resume_problems
from .run_log import MetricsLog, check_metrics, replica_fingerprints, write_summary
from .samples import write_sample_grid
from .whole_weights import sampling_decoder, shards_weights, state_part, whole_head

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


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0  # this process's data epoch and position (records consumed, skipped ones included)
    position: int = 0
    waiting: list[int] = field(default_factory=list)  # positions read but not batched yet (bucketed batching)
    window: list[float] = field(default_factory=list)  # micro-batch losses since the last logged step


class NonFinite(Exception):
    """Internal: a loss or gradient norm that is inf / NaN on some process (raised on every process alike)."""


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """Randomness of one micro-batch from (seed, step, rank, micro) alone, so a resumed run draws exactly what the
    uninterrupted run drew at the same step."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


def has_accelerator() -> bool:
    """A GPU-like device torch can use (CUDA, and on torch >= 2.6 also XPU, MPS, ...)."""
    api = getattr(torch, "accelerator", None)
    return api.is_available() if api is not None and hasattr(api, "is_available") else torch.cuda.is_available()


TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


def make_accelerator(cfg: RunConfig, out: Path) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    if mp == "fp16" and not has_accelerator():  # accelerate would run it in fp32 without a word
        raise SetupError("train.mixed_precision=fp16 needs a GPU; on CPUs use bf16 or no (or auto)")
    log_with = None if cfg.train.report_to == "none" else cfg.train.report_to
    if log_with and not TRACKERS[log_with]():  # accelerate would only warn and log nowhere
        raise SetupError(f"train.report_to={log_with!r} but {log_with} is not installed; pip install {log_with}")
    # without cpu=True accelerate treats `torchrun --nproc_per_node=N` on a machine without GPUs as N separate
    # single-process runs (each "rank 0", all writing the same folder) instead of one gloo process group
    try:
        acc = Accelerator(
            cpu=not has_accelerator(),
            gradient_accumulation_steps=cfg.train.grad_accum,
            mixed_precision=mp,
            log_with=log_with,
            project_dir=str(out),
            step_scheduler_with_optimizer=False,  # the schedule is in optimizer steps: we step it once per step
        )
    except ImportError as e:  # e.g. a DeepSpeed launch without deepspeed installed
        raise SetupError(f"accelerate cannot set up this launch: {e}") from e
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # accelerate launch says so in the environment
        if os.environ.get(f"ACCELERATE_USE_{kind.value}", "false").lower() == "true" and acc.distributed_type != kind:
            raise SetupError(
                f"the launcher asked for {kind.value} but accelerate set up {acc.distributed_type.value} (no GPU "
                "here?): FSDP and DeepSpeed run on GPUs only; on CPUs launch with torchrun (DDP over gloo)"
            )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise SetupError(
            f"launched as {launched} processes but accelerate set up {acc.num_processes}; check the launcher"
        )
    return acc


@dataclass
class Run:
    """Everything a run holds once set up (module, optimizer and scheduler already prepared by accelerate)."""

    acc: Accelerator
    mllm: MLLMAdapter
    decoder: DecoderAdapter
    head: MetaQueryHead
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: SampleDataset
    cache: LatentCache | None
    resume: tuple[Path, dict] | None  # the checkpoint to continue and its state (checked), or None: from step 0


def check_fsdp_wrap(acc: Accelerator, module: nn.Module) -> None:
    """FSDP's transformer wrap policy stops on a layer class the trained module lacks (configs/accelerate/fsdp.yaml
    names Sana blocks, which a frozen decoder does not bring): name the classes to launch with instead."""
    if acc.distributed_type != DistributedType.FSDP:
        return
    names = getattr(acc.state.fsdp_plugin, "transformer_cls_names_to_wrap", None) or []
    names = names.split(",") if isinstance(names, str) else list(names)
    present = {type(m).__name__ for m in module.modules()}
    if missing := [name for name in names if name not in present]:
        have = ",".join(name for name in names if name in present) or "EncoderLayer"
        raise SetupError(
            f"FSDP is set to wrap the layer classes {missing}, which the trained modules of this run do not have "
            f"(a frozen decoder is not part of them); launch with --fsdp_transformer_layer_cls_to_wrap {have}"
        )


def check_image_sizes(cfg: RunConfig, decoder: DecoderAdapter) -> None:
    """Every training image size fits the decoder's latent grid: refused now, not at the first step's VAE encode."""
    d = cfg.data
    if d.kind == "toyworld":
        key, sizes = "data.toyworld_size", [(d.toyworld_size, d.toyworld_size)]
    elif d.buckets:
        key, sizes = "data.buckets", [(w, h) for w, h in d.buckets]
    else:
        key, sizes = "data.resolution", [(d.resolution, d.resolution)]
    for w, h in sizes:
        try:
            decoder.latent_shape(1, h, w)
        except ValueError as e:
            raise SetupError(f"{key}: {e}") from e


def setup(cfg: RunConfig) -> Run:
    """Accelerator, data, frozen models, the head, what trains, the latent cache, optimizer; all prepared."""
    acc = make_accelerator(cfg, Path(cfg.train.output_dir))
    resume = find_resume(acc, cfg, Path(cfg.train.output_dir) / "checkpoints")  # refused before anything is loaded
    set_seed(cfg.train.seed)
    try:  # data first: a wrong layout or path fails in a second, before the models load
        data = open_training_data(cfg, rank=acc.process_index, world_size=acc.num_processes)
    except (ValueError, TypeError, OSError) as e:
        raise SetupError(f"cannot open the training data (data.kind={cfg.data.kind!r}): {e}") from e
    try:
        mllm, decoder = load_models(cfg.model, acc.device)
        head = build_head(cfg.model, mllm, decoder)
    except (ValueError, OSError) as e:  # unsupported family, broken folder, init checkpoint for other models
        raise SetupError(f"cannot set up the models: {e}") from e
    check_image_sizes(cfg, decoder)
    set_decoder_mode(decoder, cfg.model.decoder_mode, cfg.model.lora_rank)
    log.info("trainable parameter values per role: %s", count_trainable(mllm, head, decoder))
    head.connector.gradient_checkpointing = cfg.train.gradient_checkpointing
    mllm.gradient_checkpointing = cfg.train.gradient_checkpointing  # the query pass through the frozen layers
    if cfg.train.gradient_checkpointing and cfg.model.decoder_mode != "frozen":
        decoder.denoiser.enable_gradient_checkpointing()
    cache = prepare_latent_cache(cfg, decoder, acc, data) if cfg.data.cache_latents else None
    roles = {"queries": head.queries, "connector": head.connector}
    if cfg.model.decoder_mode != "frozen":
        roles["decoder"] = decoder.denoiser
    optimizer, scheduler = make_optimizer(roles, cfg.optim, cfg.train.steps)
    module = TrainStep(head, mllm, decoder, prefix_cache=cfg.train.prefix_cache)
    check_fsdp_wrap(acc, module)
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    return Run(acc, mllm, decoder, head, module, optimizer, scheduler, data, cache, resume)


def train(cfg: RunConfig) -> Path:
    """Run the configured stage; returns the path of the exported MetaQuery checkpoint."""
    check_run(cfg)
    run = setup(cfg)
    acc, out, ckpt_root = run.acc, Path(cfg.train.output_dir), Path(cfg.train.output_dir) / "checkpoints"
    progress, resumed = restore(run)
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
        if acc.log_with:
            acc.init_trackers("metaqueries")
    metrics = MetricsLog(acc, out / "metrics.jsonl", resume_step=progress.step if resumed else None)
    # instruct grids show fixed data samples: read them from a separate reader so they never count as skips
    grids = acc.is_main_process and cfg.train.sample_every and cfg.train.stage == "instruct"
    sample_data = open_training_data(cfg, rank=0, world_size=1) if grids else None

    batches = iter_batches_from(run.data, cfg, progress.epoch, progress.position, progress.waiting)
    bar = tqdm(
        total=cfg.train.steps, initial=progress.step, disable=not acc.is_local_main_process, desc=cfg.train.stage
    )
    t_log, seen, loss = time.perf_counter(), 0, float("nan")
    while progress.step < cfg.train.steps:
        for micro in range(cfg.train.grad_accum):
            samples, (progress.epoch, progress.position, progress.waiting) = next(batches)
            seed = step_seed(cfg.train.seed, progress.step, acc.process_index, micro)
            try:
                micro_loss, grad_norm = accumulate(
                    acc, run.module, run.optimizer, run.scheduler, to_model_batch(samples), cfg, seed, run.cache
                )
            except NonFinite as e:
                raise diverged(e, progress.step + 1, ckpt_root) from None
            seen += len(samples)
            progress.window.append(micro_loss)
        progress.step += 1
        bar.update(1)
        if progress.step % cfg.train.log_every == 0 or progress.step == cfg.train.steps:
            rate = seen * acc.num_processes / (time.perf_counter() - t_log)  # over the logging window
            # the largest group LR: with optim.head_hold_steps the queries' group sits at 0 while the decoder trains
            lr = max(run.scheduler.get_last_lr())
            record = {"step": progress.step, "loss": float(np.mean(progress.window)), "lr": lr}
            record.update(grad_norm=grad_norm, samples_per_s=rate, epoch=progress.epoch, position=progress.position)
            # collectives: every process is at this step
            record.update({f"skipped/{k}": v for k, v in summed(acc, run.data.skips.counts).items()})
            record.update(summed(acc, run.cache.metrics()) if run.cache else {})  # this session's hits and misses
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{rate:.1f}")
            metrics.write(record)
            t_log, seen, progress.window, loss = time.perf_counter(), 0, [], record["loss"]
        if cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
            if progress.step < cfg.train.steps:  # the last step is exported instead
                save_training_state(acc, ckpt_root, progress, dict(run.data.skips.counts), cfg)
        if should_sample(cfg, progress.step):
            write_periodic_grid(run, cfg, sample_data, out / "samples" / f"step-{progress.step:08d}.png")
    bar.close()
    return finish(run, cfg, sample_data, loss)


def diverged(error: NonFinite, step: int, ckpt_root: Path) -> TrainingDiverged:
    latest = checkpoints.latest_checkpoint(ckpt_root)
    return TrainingDiverged(
        f"{error} at step {step}; stopped before the optimizer step. The last good checkpoint is "
        f"{latest if latest else 'none (no checkpoint was written yet)'}; lower optim.lr, raise optim.warmup_steps "
        "or check the data, then resume from it with --train.resume=true"
    )


def write_periodic_grid(run: Run, cfg: RunConfig, sample_data: SampleDataset | None, path: Path) -> None:
    """A grid from the training modules; under FSDP from whole copies, after every process gathers the weights."""
    head, decoder = run.head, run.decoder
    if shards_weights(run.acc):
        state = run.acc.get_state_dict(run.module)  # a collective: every process comes here
        if run.acc.is_main_process:
            head = whole_head(run.head, state).to(run.mllm.device)
            decoder = sampling_decoder(run.acc, run.decoder, cfg.model, state, run.mllm.device)
    if run.acc.is_main_process:
        write_sample_grid(path, run.mllm, head, decoder, cfg, sample_data)


def should_sample(cfg: RunConfig, step: int) -> bool:
    """Periodic grids; the last step has none, because the final grid (of the exported head) follows it."""
    return bool(cfg.train.sample_every) and step % cfg.train.sample_every == 0 and step < cfg.train.steps


def accumulate(
    acc: Accelerator,
    step_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mb: ModelBatch,
    cfg: RunConfig,
    seed: int,
    cache: LatentCache | None = None,
) -> tuple[float, float]:
    """One micro-batch: dropout, encode targets (or read cached latents), loss, backward; the optimizer steps when
    accumulation completes. Returns (loss averaged over processes, gradient norm or nan before the sync step)."""
    inner = acc.unwrap_model(step_module)
    mllm, decoder, head = inner._mllm, inner._decoder, inner.head
    prompts, images = drop_conditions(mb.prompts, mb.images, cfg.train, np.random.default_rng(seed))
    batch = head.prepare(mllm, prompts, images)
    x0 = cache.get(mb.keys) if cache is not None else None  # (B, c, h, w) or None
    if x0 is None:
        with torch.no_grad():
            x0 = decoder.encode(mb.targets.to(acc.device, decoder.dtype))  # (B, c, h, w)
    # one memory layout whatever the source: the VAE can return channels-last strides, cached latents are contiguous,
    # and the layout decides which conv kernels run (and so the last bits of the gradients)
    x0 = x0.to(acc.device, decoder.dtype).contiguous()  # (B, c, h, w)
    g = torch.Generator().manual_seed(seed)
    u, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)  # (B,), (B, c, h, w)
    grad_norm = float("nan")
    with acc.accumulate(step_module):
        with acc.autocast():
            loss = step_module(batch, x0, u, noise)
        mean_loss = acc.reduce(loss.detach().float(), reduction="mean")  # the same value on every process
        if not torch.isfinite(mean_loss):
            raise NonFinite(f"the loss became {mean_loss.item()}")
        acc.backward(loss)
        if acc.sync_gradients:
            # None under DeepSpeed, which clips inside its own step (set gradient_clipping in its config)
            norm = acc.clip_grad_norm_(step_module.parameters(), cfg.optim.grad_clip or float("inf"))
            grad_norm = float("nan") if norm is None else float(norm)
            if norm is not None and not np.isfinite(grad_norm):  # gradients are synced: the same on every process
                optimizer.zero_grad(set_to_none=True)
                raise NonFinite(f"the gradient norm became {grad_norm}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return mean_loss.item(), grad_norm


def iter_batches_from(
    data, cfg: RunConfig, epoch: int, position: int, waiting: Sequence[int] = ()
) -> Iterator[tuple[list[Sample], tuple[int, int, list[int]]]]:
    """Endless batches across epochs from a saved data position; yields (samples, (epoch, position, waiting) after
    them): what a checkpoint saves so that a resume draws exactly the batches that follow."""
    while True:
        it = data.iter_from(epoch, position, waiting)
        batches = Batches(it, cfg.train.batch_size, by_bucket=cfg.data.buckets is not None)
        produced = False
        for samples in batches:
            produced = True
            yield samples, (epoch, it.position, batches.waiting)
        if not produced and position == 0:  # a whole epoch without one full batch would loop here forever
            raise NoUsableSampleError(
                f"epoch {epoch} of {data!r} gave {it.yielded} usable samples on this process, not enough for one "
                f"batch of train.batch_size={cfg.train.batch_size}; skipped: {it.skips}"
            )
        epoch, position, waiting = epoch + 1, 0, ()


def summed(acc: Accelerator, counts: Mapping[str, int]) -> dict[str, int]:
    """Counts of all processes, summed, in key order (a collective: call on every process)."""
    total: Counter[str] = Counter()
    for part in gather_object([dict(counts)]):
        total.update(part)
    return dict(sorted(total.items()))


def save_training_state(
    acc: Accelerator, root: Path, progress: Progress, skips: dict[str, int], cfg: RunConfig
) -> None:
    """Every process writes its part (RNG states, FSDP shards) into one temp folder; the main process then renames
    it into place, with the config (what a resume is checked against). A kill at any point leaves the previous
    complete checkpoint as the newest."""
    tmp = checkpoints.temp_dir(root, progress.step)
    if acc.is_main_process and tmp.exists():  # a leftover of a killed save
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    mine = {"epoch": progress.epoch, "position": progress.position, "waiting": progress.waiting}
    mine.update(skips=skips, loss_window=progress.window)
    ranks = gather_object([mine])
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": progress.step, "world_size": acc.num_processes, "ranks": ranks, "config": config_to_dict(cfg)}
        checkpoints.publish(root, tmp, progress.step, state, cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


def start_over(root: Path, export_name: str) -> None:
    """train.overwrite: delete what an earlier run left in the output folder (its checkpoints, record, sample grids
    and export), so nothing of it outlives this run's start. A latent cache stays: it is checked before reuse."""
    out = root.parent
    earlier = [out / name for name in (*RUN_FILES, export_name) if (out / name).is_file()]
    folders = [folder for folder in (root, out / "samples") if folder.is_dir()]
    if folders or earlier:
        log.warning("train.overwrite: deleting the earlier run in %s", out)
    for folder in folders:
        shutil.rmtree(folder)
    for path in earlier:
        path.unlink()


def find_resume(acc: Accelerator, cfg: RunConfig, root: Path) -> tuple[Path, dict] | None:
    """With `train.resume`, the newest complete checkpoint and its state, checked against this run (process count,
    config: `resume_check`) before any data, model or latent cache is touched; None to start at step 0."""
    if acc.is_main_process:
        for stale in checkpoints.remove_leftovers(root):
            log.warning("removed %s, the unfinished save of a killed run", stale)
        if cfg.train.overwrite:
            start_over(root, cfg.train.export_name)
    acc.wait_for_everyone()
    latest = checkpoints.latest_checkpoint(root) if cfg.train.resume else None
    if latest is None:
        if cfg.train.resume:
            log.info("train.resume: no checkpoint in %s yet, starting at step 0", root)
        return None
    try:
        state = checkpoints.read_state(latest)
    except checkpoints.DamagedCheckpoint as e:
        raise SetupError(f"train.resume: {e}") from e
    if state["world_size"] != acc.num_processes:
        raise SetupError(
            f"{latest} was written by {state['world_size']} processes, this run has {acc.num_processes}; resume with "
            "the same number (the data split depends on it), or start a new run from an export via "
            "model.init_checkpoint"
        )
    if "config" not in state:
        log.warning("%s records no config (an older version wrote it): the resume cannot be checked", latest)
    elif problems := resume_problems(state["config"], cfg, state["step"]):
        raise SetupError(
            f"train.resume: this config does not continue the run of {latest}: " + "; ".join(problems) + ". Resume "
            "with the run's settings (only paths, logging, saving, sampling, train.steps, the learning rates and "
            "speed / memory switches may change), or start a new run from an export via model.init_checkpoint"
        )
    check_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
    return latest, state


def restore(run: Run) -> tuple[Progress, bool]:
    """Load the checkpoint `find_resume` chose into the prepared objects; -> (progress, resumed). Its learning
    rates are the config's from there on."""
    if run.resume is None:
        return Progress(), False
    latest, state = run.resume
    acc = run.acc
    rates = current_rates(run.scheduler)
    try:
        acc.load_state(str(latest))
    except torch.OutOfMemoryError:
        raise
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:  # a damaged (truncated, overwritten) file
        raise SetupError(f"train.resume: cannot load {str(latest)!r} ({e}); {checkpoints.how_to_go_on(latest)}") from e
    except (OSError, RuntimeError) as e:  # unreadable, or weights that do not fit (other model folders)
        first = str(e).strip().splitlines()[0][:300]
        raise SetupError(
            f"train.resume: cannot load {str(latest)!r} into this run ({first}): a file of it cannot be read, or "
            "model.mllm / model.decoder are not the models it was trained with"
        ) from e
    set_base_rates(run.scheduler, rates)  # the config's rates, not the checkpoint's (e.g. lowered after a divergence)
    mine = state["ranks"][acc.process_index]
    run.data.skips.counts.update(mine["skips"])
    log.info("resumed from %s at step %d", latest, state["step"])
    # the losses since the last logged step, so the first record after the resume averages the same window
    data = mine["epoch"], mine["position"], list(mine.get("waiting", []))
    return Progress(state["step"], *data, list(mine.get("loss_window", []))), True


def finish(run: Run, cfg: RunConfig, sample_data: SampleDataset | None, loss: float) -> Path:
    """Replica check, export of the node checkpoint (from the gathered state, so FSDP shards work too), summary."""
    acc, step_module, mllm, decoder = run.acc, run.module, run.mllm, run.decoder
    fingerprints = replica_fingerprints(acc, acc.unwrap_model(step_module))
    state = acc.get_state_dict(step_module)  # a collective under FSDP / DeepSpeed ZeRO-3
    export = Path(cfg.train.output_dir) / cfg.train.export_name
    if acc.is_main_process:
        out = Path(cfg.train.output_dir)
        export_head = whole_head(run.head, state)
        denoiser_state = state_part(state, "denoiser.")
        if not denoiser_state and cfg.model.decoder_mode == "frozen":
            denoiser_state = decoder.denoiser.state_dict()
        carried = bool(cfg.model.init_checkpoint) and checkpoint_has_decoder(cfg.model.init_checkpoint)
        decoder_state = decoder_export_state(denoiser_state, cfg.model.decoder_mode, carried=carried)
        config = config_for(export_head, mllm=mllm, decoder=decoder, stage=cfg.train.stage)
        save_checkpoint(export, export_head, config, decoder_state)
        log.info("exported %s", export)
        if cfg.train.sample_every:  # with the exported head: whole weights even where training shards them
            grid_decoder = sampling_decoder(acc, decoder, cfg.model, state, mllm.device)
            write_sample_grid(
                out / "samples" / "final.png", mllm, export_head.to(mllm.device), grid_decoder, cfg, sample_data
            )
        summary = {"steps": cfg.train.steps, "final_loss": loss, "export": str(export), "stage": cfg.train.stage}
        summary.update(processes=acc.num_processes, replica_fingerprints=fingerprints)
        write_summary(out / "summary.json", summary)
    acc.wait_for_everyone()
    if acc.log_with:
        acc.end_training()
    return export
