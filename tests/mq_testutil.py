"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""

MLLM_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl", "qwen2", "qwen3"]
VISION_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "internvl"]


def trainer_args(folders, out, *extra: str) -> list[str]:
    """CLI overrides of a few-step toy-world training run on the tiny folders (MLLM, decoder); an `extra` override
    replaces the default of its key (the CLI refuses a key given twice)."""
    defaults = [
        f"--model.mllm={folders[0]}",
        f"--model.decoder={folders[1]}",
        "--model.num_queries=4",
        "--model.connector.depth=1",
        "--data.toyworld_size=32",
        "--optim.warmup_steps=1",
        "--train.batch_size=2",
        "--train.sample_every=0",
        "--train.log_every=1",
        f"--train.output_dir={out}",
    ]
    return merged(defaults, extra)


def merged(defaults, extra) -> list[str]:
    """`defaults` with every `--key=value` of `extra` replacing the one of the same key (added when new)."""
    given = {arg.partition("=")[0] for arg in extra}
    return [arg for arg in defaults if arg.partition("=")[0] not in given] + list(extra)
