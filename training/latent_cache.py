"""Cached VAE latents (`data.cache_latents: true`): the targets are encoded once by the frozen VAE, before training,
and the loop reads the stored latents instead of running the VAE encoder every step.

The pre-pass walks exactly the batches the run will draw in its first epoch (the same grouping, so the latents are
bit-identical to the ones the loop would compute), capped at `train.steps * train.grad_accum` batches. Each process
encodes its own share into `rank*.safetensors` files; every process then reads the union (a shared file system, as
for checkpoints), because later epochs deal the records to the ranks differently. A key the cache does not hold
(e.g. a record dropped at the end of epoch 0) is encoded on the fly and counted as a miss.

A cache is reused when its fingerprint (decoder folder + VAE config and weight files, data options, the size and
mtime of every data file, seed, batch size, world size, number of batches) matches; otherwise it is rebuilt, and the
log says which part changed. The data files are the shards, the parquet / arrow files, or the JSONL manifest and every
image its lines name; images that an hf table names by path are not stat'ed (their rows are, through the table).
Only deterministic targets can be cached, so `data.random_crop` is refused (see preflight)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from metaqueries_core.decoders import DecoderAdapter
from metaqueries_core.file_modes import apply_umask

from .batches import to_model_batch
from .config import RunConfig
from .config_io import config_to_dict
from .data import SampleDataset
from .preflight import SetupError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SIZE = 512  # latents per safetensors file: bounded memory while encoding, few open files while reading
CACHE_FILE = re.compile(r"rank\d{5}(-\d{5}\.safetensors|\.json)")  # what encode_share writes
OWN_FILES = {MANIFEST, f"{Path(MANIFEST).stem}.tmp"}


class LatentCache:
    """Sample key -> stored latent (c, h, w); safetensors files are opened lazily and memory-mapped."""

    def __init__(self, folder: Path, index: dict[str, tuple[str, str]]) -> None:
        self.folder = folder
        self.index = index
        self.hits = 0
        self.misses = 0
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, keys: list[str]) -> torch.Tensor | None:
        """The latents of `keys` stacked to (B, c, h, w), or None when any key is missing (counted as misses)."""
        if any(k not in self.index for k in keys):
            self.misses += len(keys)
            return None
        self.hits += len(keys)
        return torch.stack([self._tensor(*self.index[k]) for k in keys])  # (B, c, h, w)

    def _tensor(self, file: str, name: str) -> torch.Tensor:
        if file not in self._files:
            self._files[file] = safe_open(str(self.folder / file), framework="pt")
        return self._files[file].get_tensor(name)  # (c, h, w)

    def metrics(self) -> dict[str, int]:
        return {"latent_cache/hits": self.hits, "latent_cache/misses": self.misses}


def _plain(value: Any) -> Any:
    """JSON-normalised copy (tuples -> lists, odd objects -> str) so fingerprints compare equal after a round trip."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def dataset_files(data: SampleDataset) -> list[str]:
    """The files whose contents decide the samples of ``data``; a cache made while they were different is stale."""
    files = data.data_files()
    if files is None:
        raise SetupError(
            f"data.cache_latents cannot tell when the files of a {type(data).__name__} change (it does not list "
            "them): set data.cache_latents=false"
        )
    return files


def files_digest(paths: Iterable[str]) -> dict[str, Any]:
    """Count and sha256 of every file's path, size and mtime (stat only: cheap even for millions of images)."""
    digest = hashlib.sha256()
    count = 0
    for path in paths:
        try:
            st = os.stat(path)
            entry = f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n"
        except (FileNotFoundError, NotADirectoryError):  # the reader skips it; its appearing later changes the data
            entry = f"{path}\tmissing\n"
        digest.update(entry.encode())
        count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def fingerprint(cfg: RunConfig, decoder: DecoderAdapter, world_size: int, data: SampleDataset) -> dict[str, Any]:
    """Everything that decides which latents a cache holds and what their values are (``data``: the run's dataset)."""
    vae_dir = decoder.source / "vae" if decoder.source is not None else None
    files = []
    if vae_dir is not None and vae_dir.is_dir():
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in vae_dir.iterdir() if p.is_file())
    options = {k: v for k, v in config_to_dict(cfg.data).items() if k not in ("cache_latents", "latent_cache_dir")}
    return _plain(
        {
            "version": CACHE_VERSION,
            "decoder": str(decoder.source),
            "vae_config": dict(decoder.vae.config),
            "vae_files": files,
            "dtype": str(decoder.dtype),
            "data": options,
            "data_files": files_digest(dataset_files(data)),
            "stage": cfg.train.stage,
            "seed": cfg.train.seed,
            "batch_size": cfg.train.batch_size,
            "batches": cfg.train.steps * cfg.train.grad_accum,
            "world_size": world_size,
        }
    )


def cache_folder(cfg: RunConfig) -> Path:
    return Path(cfg.data.latent_cache_dir or Path(cfg.train.output_dir) / "latent_cache")


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that a latent cache never writes: a folder holding any is not one, and is never deleted."""
    return sorted(
        p.name for p in folder.iterdir() if not (p.is_file() and CACHE_FILE.fullmatch(p.name) or p.name in OWN_FILES)
    )


def stale_because(found: dict[str, Any] | None, want: dict[str, Any]) -> str:
    """Why a cache whose manifest holds fingerprint ``found`` (None: no manifest) cannot serve ``want``."""
    if found is None:
        return "it has no manifest (an interrupted build)"
    changed = sorted(k for k in found.keys() | want.keys() if found.get(k) != want.get(k))
    if "data_files" in changed:
        return f"the dataset's files changed since it was made (size or mtime); all differences: {changed}"
    return f"it was made for another configuration; differences: {changed}"


def prepare_latent_cache(cfg: RunConfig, decoder: DecoderAdapter, acc: Accelerator, data: SampleDataset) -> LatentCache:
    """Reuse a matching cache or build one (all processes take part); returns the merged cache on every process.
    `data` is the run's dataset, asked only for its files (the same on every process)."""
    folder = cache_folder(cfg)
    want = fingerprint(cfg, decoder, acc.num_processes, data)
    manifest = folder / MANIFEST
    found = json.loads(manifest.read_text()).get("fingerprint", {}) if manifest.is_file() else None
    reuse = found == want
    if not reuse and folder.is_dir() and (foreign := foreign_entries(folder)):  # every process sees the same folder
        which = "data.latent_cache_dir" if cfg.data.latent_cache_dir else "the default of data.latent_cache_dir"
        raise SetupError(
            f"the latent cache folder {str(folder)!r} ({which}) holds files a cache does not write "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}), so it is not deleted to rebuild the "
            "cache: move those files out, or set data.latent_cache_dir to a new or empty folder"
        )
    acc.wait_for_everyone()  # every process has decided from the same manifest before anyone changes it
    if reuse:
        log.info("reusing the latent cache in %s", folder)
    else:
        if acc.is_main_process:
            if folder.exists():
                log.info("rebuilding the latent cache in %s: %s", folder, stale_because(found, want))
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        acc.wait_for_everyone()
        index_file = encode_share(cfg, decoder, acc, folder)
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = [f"rank{r:05d}.json" for r in range(acc.num_processes)]
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": want, "indexes": files}, indent=1))
            os.replace(tmp, manifest)  # written last: a cache without a manifest is never reused
        log.info("rank %d cached %s", acc.process_index, index_file.name)
        acc.wait_for_everyone()
    return load_cache(folder)


def encode_share(cfg: RunConfig, decoder: DecoderAdapter, acc: Accelerator, folder: Path) -> Path:
    """Encode this process's targets of the batches the run will draw first; write them and their key index."""
    from .datasets import open_training_data
    from .trainer import iter_batches_from

    rank = acc.process_index
    data = open_training_data(cfg, rank=rank, world_size=acc.num_processes)  # its own skip counts, not the run's
    limit = cfg.train.steps * cfg.train.grad_accum
    index: dict[str, tuple[str, str]] = {}
    pending: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        if pending:
            name = f"rank{rank:05d}-{len(files):05d}.safetensors"
            files.append(name)
            tensors = {str(len(index) + i): z for i, z in enumerate(pending.values())}
            save_file(tensors, str(folder / name))
            apply_umask(folder / name)  # save_file makes it owner-only; the cache is reused by later runs
            index.update({key: (name, str(len(index) + i)) for i, key in enumerate(pending)})
            pending.clear()

    for n, (samples, (epoch, _, _)) in enumerate(iter_batches_from(data, cfg, 0, 0)):
        if n >= limit or epoch > 0:
            break
        mb = to_model_batch(samples)
        x0 = decoder.encode(mb.targets.to(acc.device, decoder.dtype)).cpu()  # (B, c, h, w), as the loop encodes
        for key, z in zip(mb.keys, x0):
            if key in index or key in pending:
                raise SetupError(
                    f"data.cache_latents needs unique sample keys, but {key!r} occurs twice in one epoch of "
                    f"{cfg.data.path or cfg.data.kind!r}; give the records unique keys or set data.cache_latents=false"
                )
            pending[key] = z.contiguous()  # (c, h, w)
        if len(pending) >= SHARD_SIZE:
            flush()
    flush()
    index_file = folder / f"rank{rank:05d}.json"
    index_file.write_text(json.dumps(index))
    return index_file


def load_cache(folder: Path) -> LatentCache:
    """Merge the key indexes of all ranks listed in the manifest."""
    manifest = json.loads((folder / MANIFEST).read_text())
    merged: dict[str, tuple[str, str]] = {}
    for name in manifest["indexes"]:
        for key, (file, tensor) in json.loads((folder / name).read_text()).items():
            if key in merged:
                raise SetupError(
                    f"sample key {key!r} was cached by two processes ({merged[key][0]} and {file}); the dataset's "
                    "keys are not unique, so data.cache_latents cannot be used with it"
                )
            merged[key] = (file, tensor)
    return LatentCache(folder, merged)
