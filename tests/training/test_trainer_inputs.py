"""What the trainer does with bad input (each a one-line message, never a silent fallback), cached VAE latents, and
the shipped configs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from mq_testutil import merged, trainer_args
from PIL import Image
from safetensors.torch import load_file

from metaqueries_core.checkpoint import config_for, save_checkpoint
from metaqueries_core.head import HEAD_KEYS
from training.config import RunConfig
from training.config_io import load_config
from training.latent_cache import MANIFEST
from training.run import main
from training.run_log import read_metrics
from training.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def args(folders, out: Path, *extra: str) -> list[str]:
    return trainer_args(folders, out, *merged(["--train.steps=3"], extra))


def broken_shard(path: Path, good: int, bad: int) -> Path:
    """A webdataset shard with `good` readable images and `bad` truncated ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    records = [(f"g{i}", buf.getvalue()) for i in range(good)] + [(f"b{i}", buf.getvalue()[:50]) for i in range(bad)]
    with tarfile.open(path, "w") as tar:
        for key, image in records:
            for ext, data in (("png", image), ("txt", b"a red square")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------- bad input


def test_config_typo_exits_2_naming_the_key(folders, tmp_path, capsys):
    assert main(args(folders, tmp_path, "--train.stepz=3")) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stepz'" in err and "did you mean 'train.steps'" in err
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  mllm: x\n  decoder_mod: full\n")
    assert main([str(yaml_file)]) == 2
    assert "unknown config key 'model.decoder_mod'" in capsys.readouterr().err


def test_missing_model_folder_is_named(folders, tmp_path, capsys):
    missing = tmp_path / "no_such_mllm"
    assert main(args(folders, tmp_path / "run", f"--model.mllm={missing}")) == 1
    err = capsys.readouterr().err
    assert f"model.mllm folder {str(missing)!r} cannot be used: it does not exist" in err
    assert main(args(folders, tmp_path / "run", "--model.init_checkpoint=nope.safetensors")) == 1
    assert "model.init_checkpoint 'nope.safetensors' is not a file" in capsys.readouterr().err


def test_dataset_without_usable_samples_is_a_clear_error(folders, tmp_path, capsys):
    shard = broken_shard(tmp_path / "bad" / "0.tar", good=0, bad=3)
    assert (
        main(args(folders, tmp_path / "run", "--data.kind=webdataset", f"--data.path={shard}", "--data.resolution=32"))
        == 1
    )
    assert "no usable sample in" in capsys.readouterr().err
    few = broken_shard(tmp_path / "few" / "0.tar", good=1, bad=1)  # one sample never fills a batch of 2
    assert (
        main(args(folders, tmp_path / "run", "--data.kind=webdataset", f"--data.path={few}", "--data.resolution=32"))
        == 1
    )
    err = capsys.readouterr().err
    assert "gave 1 usable samples on this process, not enough for one batch of train.batch_size=2" in err
    assert "decode_error: 1" in err


def test_a_used_output_folder_needs_resume_or_overwrite(folders, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-00000005").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000005" / "trainer_state.json").write_text("{}")
    assert main(args(folders, tmp_path / "run")) == 1
    assert "pass --train.resume=true to continue it, --train.overwrite=true" in capsys.readouterr().err
    assert main(args(folders, tmp_path / "run", "--train.overwrite=true")) == 0
    assert not (tmp_path / "run" / "checkpoints" / "step-00000005").exists()


def test_a_finished_run_without_checkpoints_is_not_overwritten(folders, tmp_path, capsys):
    """A run that saved only its export is an earlier run too; overwrite deletes it when the new run starts."""
    out = tmp_path / "run"
    assert main(args(folders, out, "--train.checkpoint_every=0")) == 0
    export = (out / "metaquery.safetensors").read_bytes()
    assert main(args(folders, out, "--train.checkpoint_every=0", "--optim.lr=5e-4")) == 1
    assert "already holds an earlier run (metrics.jsonl, summary.json, metaquery.safetensors)" in (
        capsys.readouterr().err
    )
    assert (out / "metaquery.safetensors").read_bytes() == export
    assert main(args(folders, out, "--train.checkpoint_every=0", "--train.resume=true", "--optim.lr=5e-4")) == 1
    assert "holds a finished run" in capsys.readouterr().err  # no checkpoint: it would train again from step 0
    assert main(args(folders, out, "--train.checkpoint_every=0", "--train.overwrite=true", "--train.steps=0")) == 2
    assert (out / "metaquery.safetensors").read_bytes() == export  # a config error changes nothing
    (out / "samples").mkdir()
    (out / "samples" / "step-00000002.png").write_bytes(b"grid")
    assert main(args(folders, out, "--train.checkpoint_every=0", "--train.overwrite=true", "--optim.lr=5e-4")) == 0
    assert (out / "metaquery.safetensors").read_bytes() != export and not (out / "samples").exists()


@pytest.mark.parametrize("what", ["file", "export_folder"])
def test_an_output_folder_the_run_cannot_use_is_named_before_loading(folders, tmp_path, capsys, what):
    out = tmp_path / "run"
    if what == "file":
        out.write_text("mine")
        expected = f"train.output_dir {str(out)!r} is a file"
    else:
        (out / "metaquery.safetensors").mkdir(parents=True)
        expected = "metaquery.safetensors' is a folder; the run exports its checkpoint to that path"
    assert main(args(folders, out)) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_an_image_size_the_decoder_cannot_take_is_refused_before_training(folders, tmp_path, capsys):
    assert main(args(folders, tmp_path / "run", "--data.toyworld_size=33")) == 1
    err = capsys.readouterr().err
    assert "data.toyworld_size: image size 33x33 (height x width) is not allowed for the sana decoder" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the loop


def test_damaged_resume_files_are_named_with_what_to_do(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(folders, out, "--train.checkpoint_every=1")) == 0  # 3 steps: checkpoints 1 and 2, then export
    (out / "checkpoints" / "step-00000001-copy").mkdir()  # a user's copy is not a checkpoint
    newest = out / "checkpoints" / "step-00000002"
    state = (newest / "trainer_state.json").read_text()
    (newest / "trainer_state.json").write_text(state[: len(state) // 2])
    assert main(args(folders, out, "--train.checkpoint_every=1", "--train.steps=4", "--train.resume=true")) == 1
    err = capsys.readouterr().err
    assert "trainer_state.json' is damaged" in err and f"delete {str(newest)!r} to resume from the checkpoint" in err
    (newest / "trainer_state.json").write_text(state)
    from accelerate import Accelerator

    def size_mismatch(self, *a, **k):  # weights of other model folders
        raise RuntimeError("Error(s) in loading state_dict for TrainStep:\n\tsize mismatch for head.queries")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Accelerator, "load_state", size_mismatch)
        assert main(args(folders, out, "--train.checkpoint_every=1", "--train.steps=4", "--train.resume=true")) == 1
    err = capsys.readouterr().err
    assert "are not the models it was trained with" in err and "delete" not in err and "size mismatch" not in err
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert main(args(folders, out, "--train.checkpoint_every=1", "--train.steps=4", "--train.resume=true")) == 1
    err = capsys.readouterr().err
    assert f"train.resume: cannot load {str(newest)!r}" in err and "Traceback" not in err


def test_an_init_checkpoint_with_nan_weights_is_refused(folders, tmp_path, capsys, mllm_loader, decoder_loader):
    from metaqueries_core.checkpoint import load_checkpoint

    assert main(args(folders, tmp_path / "pre", "--train.steps=1")) == 0
    config, head, _ = load_checkpoint(tmp_path / "pre" / "metaquery.safetensors")
    with torch.no_grad():
        head.queries.queries[0, 0] = float("nan")
    bad = save_checkpoint(tmp_path / "diverged.safetensors", head, config)
    assert main(args(folders, tmp_path / "run", f"--model.init_checkpoint={bad}")) == 1
    assert "holds inf / NaN values in ['queries.queries']" in capsys.readouterr().err


def test_settings_accelerate_would_quietly_drop_are_refused(folders, tmp_path, capsys, monkeypatch):
    from training import trainer

    assert main(args(folders, tmp_path / "a", "--train.mixed_precision=fp16")) == 1
    assert "train.mixed_precision=fp16 needs a GPU" in capsys.readouterr().err
    monkeypatch.setitem(trainer.TRACKERS, "wandb", lambda: False)
    assert main(args(folders, tmp_path / "b", "--train.report_to=wandb")) == 1
    assert "train.report_to='wandb' but wandb is not installed" in capsys.readouterr().err


def test_init_checkpoint_for_other_models_is_refused(folders, tmp_path, capsys, mllm_loader, decoder_loader, make_head):
    mllm, sana = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, sana, num_queries=4)
    ckpt = save_checkpoint(tmp_path / "sana_head.safetensors", head, config_for(head, mllm=mllm, decoder=sana))
    sd15 = decoder_loader("sd15").source
    assert main(args(folders, tmp_path / "run", f"--model.decoder={sd15}", f"--model.init_checkpoint={ckpt}")) == 1
    err = capsys.readouterr().err
    assert "cannot set up the models: MetaQuery checkpoint does not match the loaded models" in err
    assert "decoder family: checkpoint 'sana', loaded 'sd15'" in err


def test_ctrl_c_says_how_to_continue_and_that_continues(folders, tmp_path, capsys, monkeypatch):
    from training import trainer

    save = trainer.save_training_state

    def save_then_ctrl_c(*a, **k):  # the user presses Ctrl-C right after the first checkpoint
        save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_training_state", save_then_ctrl_c)
    out = tmp_path / "run"
    try:
        code = main(args(folders, out, "--train.checkpoint_every=2"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped training.run.main as a traceback")  # raised on, it would stop pytest itself
    assert code == 130
    err = capsys.readouterr().err
    assert f"interrupted: the checkpoints written so far are in {str(out / 'checkpoints')!r}" in err
    assert "run the same command with --train.resume=true" in err
    monkeypatch.setattr(trainer, "save_training_state", save)
    assert main(args(folders, out, "--train.checkpoint_every=2", "--train.resume=true")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # step 3 after the resume


def test_ctrl_c_before_the_first_checkpoint_says_so(folders, tmp_path, capsys, monkeypatch):
    from training import trainer

    def ctrl_c(*a, **k):  # the user presses Ctrl-C during the first step
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "accumulate", ctrl_c)
    out = tmp_path / "run"
    assert main(args(folders, out, "--train.checkpoint_every=2")) == 130
    err = capsys.readouterr().err
    assert f"interrupted: no checkpoint was written yet (in {str(out / 'checkpoints')!r})" in err
    assert "--train.resume=true to start again from step 0" in err and "written so far" not in err
    monkeypatch.undo()
    assert main(args(folders, out, "--train.checkpoint_every=2", "--train.resume=true")) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_ctrl_c_in_the_toy_job_says_how_to_continue(capsys, monkeypatch):
    import training.toyjob

    def ctrl_c(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.toyjob, "run_toy_job", ctrl_c)
    try:
        code = main([])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped training.run.main as a traceback")
    assert code == 130
    assert (
        "Finished stages are reused, pretrain and instruct resume from their last checkpoint" in capsys.readouterr().err
    )


def test_cached_latents_need_deterministic_targets(folders, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text("")  # refused before it is read
    files = ["--data.kind=jsonl", f"--data.path={tmp_path / 'data.jsonl'}", "--data.resolution=32"]
    assert main(args(folders, tmp_path / "run", *files, "--data.cache_latents=true", "--data.random_crop=true")) == 1
    assert "data.cache_latents needs deterministic targets, but data.random_crop is true" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cached latents


def test_cached_latents_give_the_same_losses_and_are_reused(folders, tmp_path, monkeypatch):
    common = ("--train.steps=3",)
    plain = train(load_config(RunConfig, None, args(folders, tmp_path / "plain", *common)))
    cached = train(
        load_config(RunConfig, None, args(folders, tmp_path / "cached", *common, "--data.cache_latents=true"))
    )
    a, b = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "cached" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical latents, so identical losses
    assert b[-1]["latent_cache/hits"] == 3 * 2 and b[-1]["latent_cache/misses"] == 0
    assert torch.equal(load_file(plain)["queries"], load_file(cached)["queries"])
    cache = tmp_path / "cached" / "latent_cache"
    assert (cache / MANIFEST).is_file() and len(list(cache.glob("rank00000-*.safetensors"))) == 1

    # a second run with the same data reuses the cache: the VAE encoder is never called
    import metaqueries_core.decoders.base as base

    def no_vae(*a, **k):
        raise AssertionError("the VAE encoder ran although every latent is cached")

    monkeypatch.setattr(base.DecoderAdapter, "encode", no_vae)
    extra = ("--data.cache_latents=true", f"--data.latent_cache_dir={cache}")
    train(load_config(RunConfig, None, args(folders, tmp_path / "again", *common, *extra)))
    assert [r["loss"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl")] == [r["loss"] for r in b]


# ---------------------------------------------------------------------------------------------- shipped configs


def test_configs_are_shipped_for_every_reference_recipe():
    names = {p.stem for p in CONFIGS}
    for mllm in ("llava_ov_0p5b", "qwen2p5vl_3b", "qwen2p5vl_7b"):
        assert {f"{mllm}_sana_pretrain", f"{mllm}_sd15_pretrain"} <= names
    assert {"tiny_pretrain", "tiny_instruct", "qwen2p5vl_3b_sana_instruct", "llava_ov_0p5b_sana_instruct"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_strictly(path):
    cfg = load_config(RunConfig, path)
    assert cfg.model.mllm and cfg.model.decoder
    if cfg.train.stage == "instruct" and not path.stem.startswith("tiny"):
        assert cfg.model.init_checkpoint, "instruction tuning starts from a pretrain export"
    if cfg.model.init_checkpoint:  # the head it describes is the one its pretrain config exports (build_head checks)
        source = {
            str(Path(c.train.output_dir) / c.train.export_name): c for c in (load_config(RunConfig, p) for p in CONFIGS)
        }
        pre = source[cfg.model.init_checkpoint].model
        assert {k: getattr(cfg.model, k) for k in HEAD_KEYS} == {k: getattr(pre, k) for k in HEAD_KEYS}
    if "llava_ov" in path.stem:  # the reference feeds LLaVA-OneVision 384 x 384 centre crops
        assert cfg.model.image_crop == 384
    if "qwen2p5vl" in path.stem:  # and Qwen2.5-VL images of at least 256 tokens
        assert cfg.model.min_image_tokens == 256


def test_tiny_models_refuse_a_file_as_their_folder(tmp_path, capsys):
    from training.make_tiny_models import main as make_models

    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        make_models([str(tmp_path / "file")])
    assert exit_.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
def test_tiny_configs_run_from_the_model_kit(tmp_path, monkeypatch):
    """The README commands, shortened: write the tiny models, then pretrain and instruct from the shipped YAMLs."""
    from training.make_tiny_models import main as make_models

    monkeypatch.chdir(tmp_path)  # the tiny configs use paths relative to the working folder (runs/...)
    assert make_models(["runs/tiny_models"]) == 0
    short = ["--train.steps=3", "--train.sample_every=2", "--train.checkpoint_every=2", "--train.sample_steps=2"]
    assert main([str(REPO / "configs" / "tiny_pretrain.yaml"), *short]) == 0
    AcceleratorState._reset_state(True)
    assert main([str(REPO / "configs" / "tiny_instruct.yaml"), *short]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny_instruct" / "summary.json").read_text())
    assert summary["stage"] == "instruct" and Path(summary["export"]).is_file()
    assert (tmp_path / "runs" / "tiny_instruct" / "samples" / "final.png").is_file()
