"""Instruct sample grids: any number of usable records, and images that keep their aspect ratio."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import training.samples as samples_module
from training.config import RunConfig
from training.config_io import load_config
from training.data import NoUsableSampleError, open_dataset
from training.samples import grid, write_sample_grid

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (64, 64, 64)


def instruct_jsonl(root, usable: int):
    """A manifest with ``usable`` good instruct lines (a wide red source, a tall blue target) and one broken line."""
    root.mkdir()
    Image.new("RGB", (16, 8), RED).save(root / "source.png")
    Image.new("RGB", (8, 16), BLUE).save(root / "target.png")
    lines = [
        {"source_images": ["source.png"], "instruction": f"edit {i}", "target": "target.png"} for i in range(usable)
    ]
    lines.append({"source_images": ["gone.png"], "instruction": "missing", "target": "target.png"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def instruct_cfg(tmp_path, data) -> RunConfig:
    extra = ["--train.stage=instruct", "--data.kind=jsonl", f"--data.path={data}", "--data.resolution=16"]
    return load_config(RunConfig, None, [*extra, f"--train.output_dir={tmp_path / 'run'}"])


@pytest.fixture
def fake_generate(monkeypatch):
    """generate() without models: one white image per prompt, at the requested size."""
    prompts_seen = []

    def generate(mllm, head, decoder, prompts, *, height, width, **kw):
        prompts_seen.append(list(prompts))
        return torch.ones(len(prompts), 3, height, width)  # (B, 3, H, W) in [0, 1]

    monkeypatch.setattr(samples_module, "generate", generate)
    return prompts_seen


def test_instruct_grid_uses_the_records_there_are(tmp_path, fake_generate):
    data = instruct_jsonl(tmp_path / "d", usable=2)
    cfg = instruct_cfg(tmp_path, data)
    ds = open_dataset("jsonl", str(data), "instruct", shuffle=False)
    path = write_sample_grid(tmp_path / "g.png", None, torch.nn.Linear(1, 1), None, cfg, ds)
    assert fake_generate == [["edit 0", "edit 1"]]
    with Image.open(path) as im:
        assert im.size == (3 * 18 + 2, 2 * 18 + 2)  # 2 rows of source, target, generated in 16x16 cells


def test_instruct_grid_without_a_usable_record_is_a_clear_error(tmp_path, fake_generate):
    data = instruct_jsonl(tmp_path / "d", usable=0)
    ds = open_dataset("jsonl", str(data), "instruct", shuffle=False)
    with pytest.raises(NoUsableSampleError, match="the instruct sample grid needs at least one usable sample"):
        write_sample_grid(tmp_path / "g.png", None, torch.nn.Linear(1, 1), None, instruct_cfg(tmp_path, data), ds)


def test_grid_letterboxes_images_of_other_shapes():
    wide, tall = Image.new("RGB", (16, 8), RED), Image.new("RGB", (8, 16), BLUE)
    canvas = grid([[wide, tall]], pad=0)  # cells of the largest width by the largest height: 16x16
    assert canvas.size == (32, 16)
    assert canvas.getpixel((8, 8)) == RED and canvas.getpixel((8, 1)) == canvas.getpixel((8, 14)) == GREY
    assert canvas.getpixel((24, 8)) == BLUE and canvas.getpixel((17, 8)) == canvas.getpixel((30, 8)) == GREY
    small = grid([[wide]], pad=0, cell=(8, 8))  # shrunk to 8x4, centred
    assert small.getpixel((4, 4)) == RED and small.getpixel((4, 1)) == small.getpixel((4, 6)) == GREY
    same = Image.new("RGB", (5, 3), (1, 2, 3))
    assert list(grid([[same]], pad=0).getdata()) == list(same.getdata())  # one size: pasted untouched
