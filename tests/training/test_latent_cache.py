"""The latent cache is rebuilt when the dataset's files change, and reused while they do not."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from training.config import RunConfig
from training.config_io import load_config
from training.data import open_dataset
from training.datasets import open_training_data
from training.latent_cache import dataset_files, files_digest, prepare_latent_cache
from training.preflight import SetupError, check_cache_dir


class CountingVae:
    """A stand-in decoder: 'encodes' by average pooling and counts how many images it encoded."""

    def __init__(self) -> None:
        self.source = None
        self.vae = SimpleNamespace(config={"scaling_factor": 1.0})
        self.dtype = torch.float32
        self.encoded = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encoded += x.shape[0]
        return torch.nn.functional.avg_pool2d(x, 4)  # (B, 3, h / 4, w / 4)


def jsonl_folder(root: Path, n: int = 4) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(n)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_changed_image_rebuilds_the_cache_and_says_why(tmp_path, caplog):
    data = jsonl_folder(tmp_path / "data")
    cfg = load_config(
        RunConfig,
        None,
        [
            "--data.kind=jsonl",
            f"--data.path={data}",
            "--data.resolution=8",
            "--data.cache_latents=true",
            "--train.batch_size=2",
            "--train.steps=2",
            f"--train.output_dir={tmp_path / 'run'}",
        ],
    )
    vae = CountingVae()
    acc = Accelerator(cpu=True)
    assert (
        len(prepare_latent_cache(cfg, vae, acc, open_training_data(cfg, rank=0, world_size=1))) == 4
        and vae.encoded == 4
    )
    prepare_latent_cache(cfg, vae, acc, open_training_data(cfg, rank=0, world_size=1))
    assert vae.encoded == 4  # unchanged data: reused
    Image.new("RGB", (8, 8), (0, 255, 0)).save(data / "2.png")  # same name, new pixels
    touch_later(data / "2.png")
    with caplog.at_level(logging.INFO, logger="training.latent_cache"):
        cache = prepare_latent_cache(cfg, vae, acc, open_training_data(cfg, rank=0, world_size=1))
    assert vae.encoded == 8
    assert "the dataset's files changed since it was made" in caplog.text
    assert torch.equal(cache.get(["manifest.jsonl:3"])[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_dataset_files_cover_every_kind(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = jsonl_folder(tmp_path / "jl", n=2)
    jsonl = open_dataset("jsonl", str(data), "pretrain")
    assert dataset_files(jsonl) == [str(data / "manifest.jsonl"), str(data / "0.png"), str(data / "1.png")]
    (tmp_path / "wds").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "wds" / name).write_bytes(b"")
    wds = open_dataset("webdataset", str(tmp_path / "wds"), "pretrain")
    assert dataset_files(wds) == [str(tmp_path / "wds" / n) for n in ("00000.tar", "00001.tar")]
    (tmp_path / "pq").mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"image": [b"x"], "caption": ["c"]}), tmp_path / "pq" / name)
    hf = open_dataset("hf", str(tmp_path / "pq"), "pretrain")
    assert dataset_files(hf) == [str(tmp_path / "pq" / n) for n in ("a.parquet", "b.parquet")]

    before = files_digest(dataset_files(hf))
    touch_later(tmp_path / "pq" / "b.parquet")
    assert files_digest(dataset_files(hf)) != before and before["files"] == 2
    missing = files_digest([str(tmp_path / "gone.png")])
    (tmp_path / "gone.png").write_bytes(b"now here")
    assert files_digest([str(tmp_path / "gone.png")]) != missing


def test_a_folder_that_is_not_a_cache_is_never_deleted(tmp_path):
    """A stale cache is deleted to be rebuilt; a latent_cache_dir pointed at anything else (a dataset, a run) must
    be refused with its files left as they were."""
    data = jsonl_folder(tmp_path / "data")
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "important.txt").write_text("precious")
    args = ["--data.kind=jsonl", f"--data.path={data}", "--data.resolution=8", "--data.cache_latents=true"]
    args += ["--train.batch_size=2", "--train.steps=2", f"--data.latent_cache_dir={victim}"]
    cfg = load_config(RunConfig, None, args)
    dataset = open_training_data(cfg, rank=0, world_size=1)
    with pytest.raises(SetupError, match=r"holds files a cache does not write \(important.txt, sub\)"):
        prepare_latent_cache(cfg, CountingVae(), Accelerator(cpu=True), dataset)
    assert (victim / "important.txt").read_text() == "precious" and (victim / "sub").is_dir()
    (victim / "important.txt").unlink()
    (victim / "sub").rmdir()
    (victim / "rank00000.json").write_text("{}")  # what an interrupted build leaves: rebuilt
    assert len(prepare_latent_cache(cfg, CountingVae(), Accelerator(cpu=True), dataset)) == 4


@pytest.mark.parametrize("where", ["output_dir", "inside_data", "data"])
def test_a_cache_folder_overlapping_the_run_or_the_data_is_refused(tmp_path, where):
    data = jsonl_folder(tmp_path / "data")
    out = tmp_path / "run"
    cache = {"output_dir": out, "inside_data": data / "cache", "data": data}[where]
    args = ["--data.kind=jsonl", f"--data.path={data}", "--data.resolution=8", "--data.cache_latents=true"]
    cfg = load_config(RunConfig, None, [*args, f"--data.latent_cache_dir={cache}", f"--train.output_dir={out}"])
    with pytest.raises(SetupError, match="overlaps .* a stale cache is deleted to be rebuilt"):
        check_cache_dir(cfg)
