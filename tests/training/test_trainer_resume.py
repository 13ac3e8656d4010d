"""Checkpoints and failure: exact resume, a save killed midway, a diverged loss, and two processes (gloo) that must
hold identical weights. All float32 on the CPU, so "the same" means bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mq_testutil import merged, odd_modes, trainer_args, umask
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import training.checkpoints as checkpoints
import training.trainer as trainer
from metaqueries_core.checkpoint import load_checkpoint
from training.config import RunConfig
from training.config_io import load_config
from training.run import main
from training.run_log import read_metrics, weights_fingerprint

REPO = Path(__file__).resolve().parents[2]


def args(folders, out: Path, *extra: str) -> list[str]:
    return trainer_args(folders, out, *extra)


def run(folders, out: Path, *extra: str) -> Path:
    return trainer.train(load_config(RunConfig, None, args(folders, out, *extra)))


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_at_call(monkeypatch, n: int) -> None:
    """Make the n-th micro-batch (1-based) raise KeyboardInterrupt, as a kill of the process would stop it."""
    real, calls = trainer.accumulate, [0]

    def counted(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt(f"simulated kill at micro-batch {n}")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "accumulate", counted)


def image_manifest(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """A JSONL image folder of random images of the given (height, width), captioned "picture i"."""
    folder.mkdir()
    lines = []
    for i, (h, w) in enumerate(sizes):
        torch.manual_seed(i)
        Image.fromarray((torch.rand(h, w, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture {i}"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_resume_continues_exactly(folders, tmp_path, monkeypatch):
    # a small JSONL set (5 images, 2 full batches an epoch) so the run crosses epochs; the decoder trains too
    data = image_manifest(tmp_path / "data", [(32, 32)] * 5)
    common = (
        "--data.kind=jsonl",
        f"--data.path={data}",
        "--data.resolution=32",
        "--model.decoder_mode=full",
        "--optim.lr=1e-2",
        "--train.steps=4",
        "--train.grad_accum=2",
        "--train.checkpoint_every=2",
    )
    straight = run(folders, tmp_path / "straight", *common)

    interrupt_at_call(monkeypatch, 7)  # step 4's first micro-batch: step 3 is logged but not checkpointed
    with pytest.raises(KeyboardInterrupt):
        run(folders, tmp_path / "split", *common)
    monkeypatch.undo()
    assert checkpoints.latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-00000002"
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3]
    resumed = run(folders, tmp_path / "split", *common, "--train.resume=true")

    assert tensors_equal(load_file(straight), load_file(resumed))  # queries, connector and decoder, bit for bit
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # step 3 of the killed run was dropped, then logged again
    for ra, rb in zip(a, b):  # same data position, LR, loss and gradient at every step
        for key in ("loss", "lr", "grad_norm", "epoch", "position"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    assert a[-1]["epoch"] >= 2  # the data really wrapped around epochs


def test_a_save_killed_midway_leaves_the_previous_checkpoint_newest(folders, tmp_path, monkeypatch):
    real = checkpoints.publish

    def dies_on_step_2(root, tmp, step, state, keep):
        if step == 2:  # everything is written into the temp folder, the rename never happens
            raise KeyboardInterrupt("simulated kill during save")
        return real(root, tmp, step, state, keep)

    monkeypatch.setattr(checkpoints, "publish", dies_on_step_2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(folders, out, "--train.steps=4", "--train.checkpoint_every=1")
    monkeypatch.undo()
    root = out / "checkpoints"
    assert (root / ".tmp-step-00000002" / "model.safetensors").is_file()
    assert checkpoints.latest_checkpoint(root).name == "step-00000001"

    export = run(folders, out, "--train.steps=4", "--train.checkpoint_every=1", "--train.resume=true")
    assert export.is_file() and not (root / ".tmp-step-00000002").exists()
    assert [p.name for p in checkpoints.checkpoint_dirs(root)] == ["step-00000002", "step-00000003"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_checkpoints_export_and_latent_cache_have_the_umask_mode(folders, tmp_path):
    """Not the owner-only 0600 that save_state's safetensors weights get: a resume or a ComfyUI server may run as
    another user."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    with umask(0o022):
        common = ("--train.steps=2", "--train.checkpoint_every=1", "--data.cache_latents=true")
        export = run(folders, out, *common, f"--data.latent_cache_dir={cache}")
    assert (checkpoints.latest_checkpoint(out / "checkpoints") / "model.safetensors").is_file()
    assert export.is_file() and list(cache.rglob("*.safetensors"))
    assert odd_modes(tmp_path, 0o022) == {}


def test_publish_never_leaves_a_half_deleted_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    for step in (1, 2):
        tmp = checkpoints.temp_dir(root, step)
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"x")
        checkpoints.publish(root, tmp, step, {"step": step}, keep=2)

    def killed_rmtree(path, *a, **k):
        raise KeyboardInterrupt("killed while pruning")

    tmp = checkpoints.temp_dir(root, 3)
    tmp.mkdir()
    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.publish(root, tmp, 3, {"step": 3}, keep=2)  # step 1 is being pruned when the kill comes
    assert [p.name for p in checkpoints.checkpoint_dirs(root)] == ["step-00000002", "step-00000003"]


def test_nan_loss_stops_naming_the_last_good_checkpoint(folders, tmp_path, monkeypatch, capsys):
    real, calls = trainer.diffusion_loss, [0]

    def poisoned(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] == 4 else loss

    monkeypatch.setattr(trainer, "diffusion_loss", poisoned)
    out = tmp_path / "run"
    assert main(args(folders, out, "--train.steps=6", "--train.checkpoint_every=2")) == 1
    err = capsys.readouterr().err
    assert "training stopped: the loss became nan at step 4" in err
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-00000002'}" in err
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # intact, and no half save next to it
    state = load_file(root / "step-00000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (out / "metaquery.safetensors").exists()


def test_resume_with_another_process_count_is_refused(folders, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    ranks = [{"epoch": 0, "position": 4, "skips": {}}] * 2
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "ranks": ranks}))
    assert main(args(folders, tmp_path / "run", "--train.steps=4", "--train.resume=true")) == 1
    assert "was written by 2 processes, this run has 1" in capsys.readouterr().err


def test_a_resume_trains_at_the_configs_rates_and_refuses_other_changes(folders, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--train.steps=6", "--train.checkpoint_every=2", "--optim.warmup_steps=1")
    run(folders, out, *common, "--optim.lr=1e-2")
    first = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl")}
    # after a divergence the advice is: lower optim.lr and resume (from step 4, the newest checkpoint)
    run(folders, out, *common, "--optim.lr=1e-3", "--train.resume=true")
    again = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl")}
    assert [again[s] for s in (1, 2, 3, 4)] == [first[s] for s in (1, 2, 3, 4)]
    for step in (5, 6):  # the same schedule at a tenth of the rate
        assert again[step] == pytest.approx(first[step] / 10, rel=1e-6)

    for change, says in (
        ("--train.batch_size=3", "train.batch_size: checkpoint "),
        ("--train.seed=5", "train.seed: checkpoint 0, now 5"),
        ("--train.steps=4", "train.steps: 4 leaves nothing to train after the checkpoint's step 4"),
    ):
        assert main(args(folders, out, *merged([*common, "--optim.lr=1e-3", "--train.resume=true"], [change]))) == 1
        err = capsys.readouterr().err
        assert "does not continue the run of" in err and says in err, err


def test_two_processes_hold_identical_weights(folders, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.run"]
    cmd = launch + args(folders, out, "--train.steps=3", "--train.checkpoint_every=2")
    # two CPU processes over gloo, also on a machine with one GPU (two ranks cannot share it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    fingerprints = summary["replica_fingerprints"]
    assert summary["processes"] == 2 and len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    # the export holds exactly those replicas' weights (named as in the training module: head.*)
    _, head, _ = load_checkpoint(out / "metaquery.safetensors")
    assert weights_fingerprint(nn.ModuleDict({"head": head})) == fingerprints[0]
    state = checkpoints.read_state(out / "checkpoints" / "step-00000002")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # one writer


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_the_resume(tmp_path):
    from types import SimpleNamespace

    from training.run_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    main_process = SimpleNamespace(is_main_process=True, log_with=[])
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')  # killed mid-write
    MetricsLog(main_process, path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.9}\n')  # damage, not a kill
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record"):
        MetricsLog(main_process, path, resume_step=2)


def test_a_refused_resume_stops_before_data_models_or_the_latent_cache(folders, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ("--train.steps=4", "--train.checkpoint_every=2", "--data.cache_latents=true")
    run(folders, out, *common, f"--data.latent_cache_dir={cache}")
    manifest = next(cache.glob("*.json"))
    before = manifest.stat().st_mtime_ns

    def never(*a, **k):
        raise AssertionError("the models were loaded before the resume was checked")

    monkeypatch.setattr(trainer, "load_models", never)
    refused = main(
        args(folders, out, *common, f"--data.latent_cache_dir={cache}", "--train.resume=true", "--train.seed=5")
    )
    assert refused == 1 and "train.seed: checkpoint 0, now 5" in capsys.readouterr().err
    assert manifest.stat().st_mtime_ns == before and manifest.exists()  # the shared cache was left alone
    # a damaged metrics file is found in the same check, which every process runs (not by the main process alone
    # once the others wait in a collective)
    metrics = out / "metrics.jsonl"
    for damage, message in (("not json\n", "is not a JSON record"), ("[1, 2]\n", "is not a record with a 'step'")):
        metrics.write_text(metrics.read_text().splitlines()[0] + "\n" + damage)
        refused = main(args(folders, out, *common, f"--data.latent_cache_dir={cache}", "--train.resume=true"))
        assert refused == 1 and f"metrics.jsonl line 2 {message}" in capsys.readouterr().err


def test_a_logged_loss_after_a_resume_averages_the_whole_window(folders, tmp_path, monkeypatch):
    # logged every 3 steps, saved every 2: the resume from step 4 must bring step 4's loss into step 6's record
    common = ("--train.steps=6", "--train.log_every=3", "--train.checkpoint_every=2")
    run(folders, tmp_path / "straight", *common)
    interrupt_at_call(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(folders, tmp_path / "split", *common)
    monkeypatch.undo()
    run(folders, tmp_path / "split", *common, "--train.resume=true")
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 6] and [r["loss"] for r in a] == [r["loss"] for r in b]


def test_resume_problems_name_each_difference_and_a_config_of_another_version():
    from training.config_io import config_to_dict
    from training.resume_check import resume_problems

    cfg = load_config(RunConfig, None, ["--train.steps=10"])
    saved = config_to_dict(cfg)
    assert resume_problems(saved, cfg, 4) == []
    moved = load_config(RunConfig, None, ["--train.steps=10", "--train.batch_size=3", "--optim.lr=1e-5"])
    assert resume_problems(saved, moved, 4) == ["train.batch_size: checkpoint 16, now 3"]  # the rate may change
    paths = ["--train.steps=10", "--model.mllm=/moved/m", "--model.init_checkpoint=/moved/pre.safetensors"]
    assert resume_problems(saved, load_config(RunConfig, None, paths), 4) == []  # a moved run folder resumes
    other = {**saved, "train": {**saved["train"], "retired_key": 1}}
    (problem,) = resume_problems(other, cfg, 4)
    assert "does not read as this version's" in problem and "retired_key" in problem


def test_a_bucketed_resume_continues_exactly(folders, tmp_path, monkeypatch):
    # wide and square images in two buckets, batches of 2: at a checkpoint a sample of one size can be waiting for
    # a partner while batches of the other size go on; the resume must batch it exactly as the straight run did
    data = image_manifest(tmp_path / "data", [(16, 64) if i % 3 == 1 else (32, 32) for i in range(9)])
    common = (
        "--data.kind=jsonl",
        f"--data.path={data}",
        "--data.buckets=[[32,32],[64,16]]",
        "--model.decoder_mode=full",
        "--optim.lr=1e-2",
        "--train.steps=6",
        "--train.checkpoint_every=3",
    )
    straight = run(folders, tmp_path / "straight", *common)

    interrupt_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(folders, tmp_path / "split", *common)
    monkeypatch.undo()
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000003" / checkpoints.STATE_FILE).read_text())
    assert state["ranks"][0]["waiting"]  # the case under test: samples held in an unfinished batch
    resumed = run(folders, tmp_path / "split", *common, "--train.resume=true")

    assert tensors_equal(load_file(straight), load_file(resumed))
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [(r["loss"], r["epoch"], r["position"]) for r in a] == [(r["loss"], r["epoch"], r["position"]) for r in b]
