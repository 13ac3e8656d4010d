"""`training.config`: every range a run depends on is refused when the config is read, naming the key and the range,
before any model is loaded (until this check, a negative lr trained uphill, a negative grad_clip flipped every
gradient, and log_every=0 crashed at the first step)."""

import pytest

from training.bounds import above, at_least, within
from training.config import RunConfig
from training.config_io import ConfigError, load_config


@pytest.mark.parametrize(
    "override,message",
    [
        ("--optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("--optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("--optim.queries_lr=-0.1", "optim.queries_lr must be >= 0, got -0.1"),
        ("--optim.decoder_lr=-1", "optim.decoder_lr must be >= 0"),
        ("--optim.betas=[0.9,1.0]", r"optim.betas\[1\] must be in \[0.0, 1.0\), got 1.0"),
        ("--optim.weight_decay=-0.05", "optim.weight_decay must be >= 0"),
        ("--optim.grad_clip=-0.5", r"optim.grad_clip must be >= 0, got -0.5 \(0: no clipping\)"),
        ("--optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("--optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must be in \[0.0, 1.0\], got 1.5"),
        ("--optim.head_hold_steps=-1", "optim.head_hold_steps must be >= 0"),
        ("--model.num_queries=0", "model.num_queries must be >= 1"),
        ("--model.max_prompt_tokens=0", "model.max_prompt_tokens must be >= 1"),
        ("--model.lora_rank=0", "model.lora_rank must be >= 1"),
        ("--model.image_crop=0", r"model.image_crop must be >= 1, got 0 \(or null: no crop\)"),
        (
            "--model.min_image_tokens=0",
            r"model.min_image_tokens must be >= 1, got 0 \(or null: the MLLM folder's minimum\)",
        ),
        ("--model.train_shift=0", "model.train_shift must be > 0"),
        ("--model.connector.depth=-1", "model.connector.depth must be >= 0"),
        ("--model.connector.width=0", "model.connector.width must be >= 1"),
        ("--model.connector.heads=0", "model.connector.heads must be >= 1"),
        ("--model.connector.mlp_ratio=0", "model.connector.mlp_ratio must be > 0"),
        ("--model.connector.out_norm_scale=-1", "model.connector.out_norm_scale must be > 0"),
        ("--model.connector.init_std=0", "model.connector.init_std must be > 0"),
        ("--data.resolution=0", "data.resolution must be >= 1"),
        ("--data.buckets=[[512,-512]]", r"each bucket must be a \(width, height\) pair of positive ints"),
        ("--data.buckets=[]", "the bucket list is empty"),
        ("--train.steps=0", "train.steps must be >= 1"),
        ("--train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("--train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("--train.sample_steps=0", "train.sample_steps must be >= 1"),
        ("--train.log_every=0", "train.log_every must be >= 1"),
        ("--train.checkpoint_every=-1", r"train.checkpoint_every must be >= 0, got -1 \(0: only the final export\)"),
        ("--train.sample_every=-1", r"train.sample_every must be >= 0, got -1 \(0: never\)"),
        ("--train.guidance=-2", "train.guidance must be >= 0"),
        ("--train.image_guidance=-1", "train.image_guidance must be >= 0"),
        ("--train.drop_images=1.5", r"train.drop_images must be in \[0.0, 1.0\], got 1.5 \(a probability\)"),
        ("--train.sample_prompts=[]", "train.sample_prompts is empty while train.sample_every > 0"),
        ("--train.export_name=", "train.export_name must be a file name ending in .safetensors"),
        ("--train.export_name=out/x.safetensors", r"no folder; it is written into train.output_dir\), got 'out/x"),
        ("--train.seed=-1", r"train.seed must be in \[0, 4294967295\], got -1"),
        ("--train.seed=4294967296", r"train.seed must be in \[0, 4294967295\]"),
        ("--data.toyworld_seed=-1", r"data.toyworld_seed must be in \[0, 4294967295\]"),
        ("--data.toyworld_size=0", "data.toyworld_size must be >= 1"),
        ("--train.output_dir=", "train.output_dir is empty"),
        ("--optim.lr=nan", "config key 'optim.lr' must be a finite number"),
        ("--train.guidance=inf", "config key 'train.guidance' must be a finite number"),
    ],
)
def test_out_of_range_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_the_edge_values_that_mean_something_are_accepted():
    cfg = load_config(
        RunConfig,
        None,
        [
            "--model.connector.depth=0",  # the projection alone
            "--optim.grad_clip=0",  # no clipping
            "--optim.queries_lr=0",  # queries kept as they start
            "--optim.warmup_steps=0",
            "--optim.min_lr_ratio=0",
            "--train.checkpoint_every=0",  # only the final export
            "--train.sample_every=0",  # never sample, so no prompts are needed
            "--train.sample_prompts=[]",
        ],
    )
    assert (cfg.model.connector.depth, cfg.optim.grad_clip, cfg.optim.queries_lr) == (0, 0.0, 0.0)
    assert (cfg.train.checkpoint_every, cfg.train.sample_every, cfg.train.sample_prompts) == (0, 0, [])


def test_bounds_pass_none_and_the_closed_ends_and_refuse_the_open_ones():
    for check in (lambda v: at_least("x", v, 1), lambda v: above("x", v, 0), lambda v: within("x", v, 0, 1)):
        check(None)  # unset: the documented default applies
    at_least("x", 1, 1)
    within("x", 0.0, 0.0, 1.0)
    within("x", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x must be in \(0.0, 1.0\], got 0.0 \(why\)"):
        within("x", 0.0, 0.0, 1.0, low_open=True, why=" (why)")
    with pytest.raises(ValueError, match=r"x must be in \[0.0, 1.0\), got 1.0"):
        within("x", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match="x must be > 0, got 0"):
        above("x", 0, 0)
    for value in (float("nan"), float("inf")):  # NaN compares false with everything: it would pass every range
        for check in (lambda v: at_least("x", v, 1), lambda v: above("x", v, 0), lambda v: within("x", v, 0, 1)):
            with pytest.raises(ValueError, match="x must be a finite number"):
                check(value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.resolution=64"], r"data.resolution would be ignored with data.kind='toyworld'"),
        (["--data.path=/data/cc3m", "--data.random_crop=true"], r"data.path, data.random_crop would be ignored"),
        (["--data.kind=jsonl", "--data.path=x", "--data.toyworld_size=64"], r"data.toyworld_size would be ignored"),
        (["--train.resume=true", "--train.overwrite=true"], "train.resume and train.overwrite are both true"),
        (["--optim.decoder_lr=1e-5"], r"optim.decoder_lr is set but model.decoder_mode='frozen' trains no decoder"),
        (["--model.decoder_mode=full", "--model.lora_rank=4"], r"model.lora_rank is set but model.decoder_mode='full'"),
    ],
)
def test_options_the_run_would_ignore_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, overrides)


def test_the_options_of_the_chosen_kind_and_mode_are_accepted():
    cfg = load_config(RunConfig, None, ["--data.kind=jsonl", "--data.path=x", "--data.resolution=64"])
    assert cfg.data.resolution == 64
    cfg = load_config(RunConfig, None, ["--model.decoder_mode=lora", "--model.lora_rank=4", "--optim.decoder_lr=1e-5"])
    assert (cfg.model.lora_rank, cfg.optim.decoder_lr) == (4, 1e-5)


def test_paths_starting_with_a_tilde_are_expanded_everywhere(monkeypatch, tmp_path):
    """`--key=~/x` reaches the program unexpanded; every reader must see the same folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        RunConfig,
        None,
        ["--model.mllm=~/m", "--model.init_checkpoint=~/c.safetensors", "--train.output_dir=~/out"]
        + ["--data.kind=jsonl", "--data.path=~/d.jsonl", "--data.latent_cache_dir=~/cache"],
    )
    got = (cfg.model.mllm, cfg.model.init_checkpoint, cfg.train.output_dir, cfg.data.path, cfg.data.latent_cache_dir)
    assert got == tuple(str(tmp_path / n) for n in ("m", "c.safetensors", "out", "d.jsonl", "cache"))


def test_a_key_given_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--train.steps is given twice \('3' and '5'\)"):
        load_config(RunConfig, None, ["--train.steps=3", "--train.steps=5"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 3\nmodel:\n  num_queries: 8\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml.*key 'train' appears twice in one mapping \(line 5\)"):
        load_config(RunConfig, twice)


@pytest.mark.parametrize("make", ["folder", "latin1", "missing"])
def test_an_unreadable_config_file_is_a_config_error(tmp_path, make):
    path = tmp_path / "c.yaml"
    if make == "folder":
        path.mkdir()
    elif make == "latin1":
        path.write_bytes("train:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cannot read YAML config .*c.yaml"):
        load_config(RunConfig, path)


def test_yaml_merge_keys_still_work(tmp_path):
    """`<<: *anchor` is how YAML shares settings; the duplicate-key check must not mistake it for a key."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  <<: {lr: 3.0e-4, warmup_steps: 5}\n  warmup_steps: 10\n")
    cfg = load_config(RunConfig, path)
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (3.0e-4, 10)
