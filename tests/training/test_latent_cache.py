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
