"""`python -m training.run CONFIG.yaml [--section.key=value ...]`; with no config, the embedded toy-world job.

Exit codes: 0 done; 2 the config does not parse (unknown key, wrong type, out of range); 1 the run could not start or
stopped (a missing folder, unusable data, a diverged loss), with a one-line message saying what was wrong; 130
interrupted (Ctrl-C), with how to continue."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .config import RunConfig
from .config_io import ConfigError, describe_keys, load_config

INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


def usage() -> str:
    """This module's doc, then every key of the toy job and of a training config with its type and default."""
    from .toyjob import ToyJobConfig

    toy = "\n".join("  --" + line for line in describe_keys(ToyJobConfig()))
    run = "\n".join("  --" + line for line in describe_keys(RunConfig()))
    return (
        f"{__doc__}\n\nThe toy job (`python -m training.run [--key=value ...]`), its keys and defaults:\n{toy}\n\n"
        "A training run (`python -m training.run CONFIG.yaml [--section.key=value ...]`; examples in configs/), its "
        f"keys and defaults:\n{run}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "diffusers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config_path = argv.pop(0) if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    if config_path is None and not any(a.startswith("--model.") for a in argv):
        from .toyjob import run_toy_job

        def resume() -> str:
            return (
                "run the same command again to continue. Finished stages are reused, pretrain and instruct resume "
                "from their last checkpoint, an unfinished teach or autoencoder stage starts over"
            )

        return reported(lambda: run_toy_job(argv), resume)
    try:
        cfg = load_config(RunConfig, config_path, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .trainer import train

    def resume() -> str:
        """What to do next, from what the run left (read when it stops: it may have stopped before any checkpoint)."""
        from .checkpoints import latest_checkpoint

        where = Path(cfg.train.output_dir) / "checkpoints"
        if latest_checkpoint(where) is None:
            return (
                f"no checkpoint was written yet (in {str(where)!r}); run the same command with --train.resume=true to "
                "start again from step 0"
            )
        return (
            f"the checkpoints written so far are in {str(where)!r}; run the same command with --train.resume=true "
            "to continue from the newest"
        )

    def run_training() -> int:
        train(cfg)
        return 0

    return reported(run_training, resume)


def reported(run: Callable[[], int], resume: Callable[[], str]) -> int:
    """`run()`'s exit code, with the errors a run can stop on turned into one line and their exit code; `resume()`
    says how to go on after a file-system error or Ctrl-C."""
    from safetensors import SafetensorError

    from .data import NoUsableSampleError
    from .preflight import SetupError, TrainingDiverged

    try:
        return run()
    except (SetupError, NoUsableSampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, SafetensorError) as e:  # the file system (full disk, permissions, a missing or damaged file)
        print(f"error: {e}; {resume()}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {resume()}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
