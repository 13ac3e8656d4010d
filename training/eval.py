"""GenEval-style scoring of a MetaQuery model in the toy world, plus the frozen MLLM's understanding accuracy.

`python -m training.eval MODELS_DIR [--key=value ...]` scores the models a toy job exported (MLLM folder, decoder
folder, checkpoint) with that job's settings (its `toyjob.yaml` next to MODELS_DIR; the defaults without one), any
scoring settings overridden like the job's own (`--eval_samples=1`, `--image_guidance=3`; settings of the trained
models, such as `--seed` or `--image_size`, are refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from metaqueries_core.images import tensor_to_pil
from metaqueries_core.sampling import Guidance, generate
from metaqueries_core.toyworld import (
    EditSample,
    ToyWorld,
    accuracy_by_group,
    score_edit,
    score_image,
    score_subject,
    summarise,
)

from .config_io import ConfigError, load_config, parse_override
from .preflight import unwritable
from .samples import grid
from .toy.teach import edit_answer, generate_answers, understanding_accuracy

log = logging.getLogger(__name__)


def _generate_all(
    mllm, head, decoder, prompts: list[str], images: list[list[Image.Image]] | None, size: int, kw: dict, batch: int
) -> list[Image.Image]:
    out: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), batch), desc="scoring: generating", unit="batch", leave=False):
        sl = slice(start, start + batch)
        imgs = None if images is None else images[sl]
        out += tensor_to_pil(generate(mllm, head, decoder, prompts[sl], images=imgs, height=size, width=size, **kw))
    return out


def _score(kind: str, outputs: list[Image.Image], truths: list, heldout: list[bool], scorer: Callable) -> dict:
    return _summarise(kind, [scorer(img, scene) for img, scene in zip(outputs, truths)], heldout)


def _summarise(kind: str, scored: list[dict[str, bool]], heldout: list[bool]) -> dict:
    """`summarise` of per-image scores, logged."""
    summary = summarise(zip(scored, heldout))
    log.info(
        "%s: all %.3f (seen %.3f, held-out %.3f)",
        kind,
        summary["overall"].get("all", 0.0),
        summary["seen"].get("all", float("nan")),
        summary["heldout"].get("all", float("nan")),
    )
    return summary


def edit_breakdown(
    mllm, head, decoder, edits: list[EditSample], edits_right: list[bool], size: int, kw: dict, batch: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Which side loses an edit, per number of source objects and per operation: `edit` (`edits_right`: the image
    drawn from the instruction and source image is right), `mllm_answer` (the MLLM's greedy answer is the target
    description it was taught, `edit_answer`: the MLLM side) and `from_description` (the image drawn from that
    description as a text prompt is right: what the decoder side can draw). An edit is right only when both sides
    are."""
    examples = [(e.instruction, [e.source_image], edit_answer(e)) for e in edits]  # as the MLLM was taught them
    answers = generate_answers(mllm, examples, batch, max_new_tokens=48)
    drawn = _generate_all(mllm, head, decoder, [want for _, _, want in examples], None, size, kw, batch)
    rows = [
        (
            e,
            {
                "edit": right,
                "mllm_answer": answer.strip() == want,
                "from_description": score_edit(img, e.target_scene)["all"],
            },
        )
        for e, right, answer, (_, _, want), img in zip(edits, edits_right, answers, examples, drawn)
    ]
    groupings = {"by_source_objects": lambda e: str(len(e.source_scene.objects)), "by_op": lambda e: e.op}
    out = {
        name: accuracy_by_group(((key(e), row) for e, row in rows), sorted({key(e) for e in edits}))
        for name, key in groupings.items()
    }
    log.info("edit by source objects: %s", out["by_source_objects"])
    return out


@torch.no_grad()
def evaluate(
    mllm,
    head,
    decoder,
    world: ToyWorld,
    *,
    n_two: int,
    n_edit: int,
    n_subject: int,
    n_qa: int,
    samples_per_prompt: int,
    steps: int,
    guidance: Guidance,
    seed: int,
    batch: int = 64,
    grid_path: Path | None = None,
    understanding: dict[str, dict] | None = None,
) -> dict:
    """Scores per task, seen vs held-out. Edits and subject pairs use half held-out, half seen sources.
    Text-to-image prompts (single and two-object) get `samples_per_prompt` samples each, from seeds seed, seed + 1...

    `understanding`: `understanding_accuracy` results per split when the caller already has them (else computed)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    kw = {"steps": steps, "guidance": guidance, "seed": seed}
    size = world.size
    scores: dict = {}
    shown: list[list[Image.Image]] = []
    for kind, n in (("single", None), ("two_object", n_two)):
        prompts = world.eval_prompts(kind, n)
        outs = [  # GenEval-style: several samples per prompt, sample i from seed + i
            im
            for i in range(samples_per_prompt)
            for im in _generate_all(
                mllm, head, decoder, [p.prompt for p in prompts], None, size, kw | {"seed": seed + i}, batch
            )
        ]
        truths, heldout = [p.scene for p in prompts], [p.heldout for p in prompts]
        scores[kind] = _score(kind, outs, truths * samples_per_prompt, heldout * samples_per_prompt, score_image)
        shown.append(outs[:8])
    edits = world.edit_samples("eval_heldout", n_edit // 2) + world.edit_samples("eval_seen", n_edit - n_edit // 2)
    outs = _generate_all(
        mllm, head, decoder, [e.instruction for e in edits], [[e.source_image] for e in edits], size, kw, batch
    )
    heldout = [i < n_edit // 2 for i in range(len(edits))]
    edit_scores = [score_edit(o, e.target_scene) for o, e in zip(outs, edits)]
    scores["edit"] = _summarise("edit", edit_scores, heldout)
    right = [s["all"] for s in edit_scores]
    scores["edit_breakdown"] = edit_breakdown(mllm, head, decoder, edits, right, size, kw, batch)
    shown.append([im for e, o in list(zip(edits, outs))[:4] for im in (e.source_image, o)])
    subj = world.subject_samples("eval_heldout", n_subject // 2) + world.subject_samples(
        "eval_seen", n_subject - n_subject // 2
    )
    outs = _generate_all(
        mllm, head, decoder, [s.prompt for s in subj], [list(s.references) for s in subj], size, kw, batch
    )
    heldout = [i < n_subject // 2 for i in range(len(subj))]
    scores["subject"] = _score("subject", outs, [s.target_scene for s in subj], heldout, score_subject)
    splits = ("eval_seen", "eval_heldout")
    understanding = understanding or {split: understanding_accuracy(mllm, world, split, n_qa) for split in splits}
    scores["understanding"] = {split: understanding[split]["accuracy"] for split in splits}
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        canvas = grid(shown)
        canvas.resize((canvas.width * 4, canvas.height * 4), Image.NEAREST).save(grid_path)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.eval",
        description=__doc__,
        epilog="--key=value overrides how the models are scored: the ToyJobConfig fields eval_two_object, eval_edits, "
        "eval_subjects, eval_questions, eval_samples, eval_steps, guidance, image_guidance (e.g. --eval_samples=1).",
    )
    parser.add_argument("models", type=Path, help="models folder of a toy job (LLM/, diffusers/, metaqueries/)")
    parser.add_argument("--out", type=Path, default=None, help="scores JSON (default: MODELS/../scores.json)")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .toyjob import JOB_RECORD, ToyJobConfig, load_exported

    # score as the job that exported these models did: its settings record sits next to its models folder
    record = args.models.parent / JOB_RECORD
    found = record if record.is_file() else None
    try:
        job = load_config(ToyJobConfig, found, overrides)  # unknown keys and bad values first
        fixed = [key for key, _ in map(parse_override, overrides) if key not in ToyJobConfig.EVAL_KEYS]
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)}: settings of the trained models, not of how they are scored (they come from the "
                f"job's {JOB_RECORD}); scoring takes {', '.join(ToyJobConfig.EVAL_KEYS)}"
            )
    except ConfigError as err:
        parser.error(str(err))  # exits 2 with the usage and what was wrong
    out = args.out or args.models.parent / "scores.json"
    if problem := cannot_write(out):  # found now, not after minutes of scoring
        parser.error(f"--out {str(out)!r}: {problem}")
    log.info("scoring with %s", f"the settings in {found}" if found else "the default job's settings")
    try:
        mllm, head, decoder = load_exported(args.models)
    except (FileNotFoundError, ValueError) as err:  # missing, unreadable or mismatched models
        parser.error(f"{err} (MODELS is the models/ folder a toy job exported, e.g. outputs/toy/models)")
    scores = evaluate(
        mllm,
        head,
        decoder,
        ToyWorld(size=job.image_size, seed=job.seed),
        **job.eval_settings(),
        grid_path=out.with_suffix(".png"),
    )
    write_scores(scores, out)
    print(json.dumps(scores, indent=2))
    return 0


def write_scores(scores: dict, path: Path) -> None:
    """`scores` as JSON at `path`, written beside it and renamed: a whole file or the previous one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scores, indent=2))
    os.replace(tmp, path)


def cannot_write(path: Path) -> str | None:
    """Why the scores (and the sample grid next to them) cannot be written to `path`, or None."""
    if not path.name or path.name in (".", ".."):
        return "give a file name, e.g. scores.json"
    if path.is_dir():
        return "it is a folder; give a file name in it, e.g. scores.json"
    if path.suffix == ".png":
        return "the sample grid is written beside the scores as <name>.png; give the scores a .json name"
    return unwritable(path.parent)


if __name__ == "__main__":
    sys.exit(main())
