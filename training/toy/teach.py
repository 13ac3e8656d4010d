"""Stage 1 of the toy job: teach a tiny MLLM to understand the toy world (image or caption in, text out), before it
is frozen for good. A real MetaQuery run starts from an MLLM that already understands; this makes ours one.

Tasks (all answered in the assistant turn of the same chat format the queries later follow):
describe an image; restate a caption canonically (text-only prompts, as in text-to-image); answer a question about an
image; describe the result of an edit instruction on an image; place "the object from the image" as a prompt says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from metaqueries_core.mllm import MLLMAdapter
from metaqueries_core.mllm.base import freeze, left_pad
from metaqueries_core.toyworld import Scene, ToyWorld, scene_to_text
from metaqueries_core.toyworld.world import CAPTION_KINDS, CAPTION_LAYOUTS, POSITIONS, EditSample

from ..optim import adamw

log = logging.getLogger(__name__)

DESCRIBE = "describe the image."
TASKS = ("describe", "restate", "qa", "edit", "subject")
READING_ORDER = {p: i for i, p in enumerate(POSITIONS)}  # how an image is described: left, right, top, bottom, center


@dataclass
class TeachConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weights: tuple[float, ...] = (0.2, 0.25, 0.25, 0.2, 0.1)  # per task in TASKS order
    # text-only "restate" steps before the mix: learnt alone, copying the position word is solid in ~200 steps;
    # learnt inside the mix from the start, the model never told left from right or top from bottom (it restated
    # every "right" as "left": the image tasks' position signal arrives late and blurs it)
    restate_first: int = 0
    # share of answer tokens the model is shown wrong (replaced by another answer token of the batch) while it still
    # learns to predict the right next ones: it learns to answer from the prompt and its place in the answer rather
    # than from its own previous words. The query slots are such a wrong answer (fixed tokens after every prompt)
    answer_noise: float = 0.0
    # caption kinds of the describe and restate examples, drawn uniformly (repeats weigh more). "placed_many" (2-3
    # objects, each claimed at its region) is the form of edit targets
    caption_kinds: tuple[str, ...] = CAPTION_LAYOUTS
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.weights) != len(TASKS) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights: one non-negative weight per task {list(TASKS)}, not all 0; got {self.weights}")
        if not 0.0 <= self.answer_noise < 1.0:
            raise ValueError(f"answer_noise is a share of answer tokens in [0, 1), got {self.answer_noise}")
        if self.steps < 1 or self.restate_first < 0:
            raise ValueError(f"steps must be >= 1 and restate_first >= 0, got {self.steps} and {self.restate_first}")
        if not self.caption_kinds or not set(self.caption_kinds) <= set(CAPTION_KINDS):
            raise ValueError(
                f"caption_kinds: some of {list(CAPTION_KINDS)} (repeats weigh more), got {self.caption_kinds}"
            )


def describe(scene: Scene) -> str:
    """Every object with its colour, shape and position, in reading order (the order of POSITIONS: left, right, top,
    bottom, center): what the image shows, not what a caption claims. An image does not show which object a caption
    named first, so describing in the scene's order made the image tasks' answers a coin toss between orders.
    Captions are restated in their own order: the query slots read the prompt through that copy (toyjob.py)."""
    return scene_to_text(Scene(tuple(sorted(scene.objects, key=lambda o: READING_ORDER[o.position])), "placed"))


def edit_answer(edit: EditSample) -> str:
    """The edit's target described in the source's reading order: the source's description with the edited object
    changed where it stands (a moved object keeps its place in the sentence), a removed one left out, an added one
    last. In the target's own reading order a move reorders the sentence, which the MLLM rarely got right."""
    keys = [READING_ORDER[o.position] for o in edit.source_scene.objects]  # target object j is source object j, but:
    if edit.op == "add":
        keys.append(len(POSITIONS))
    elif edit.op == "remove":
        del keys[edit.index]
    objs = [o for _, o in sorted(zip(keys, edit.target_scene.objects), key=lambda t: t[0])]
    return scene_to_text(Scene(tuple(objs), "placed"))


def example(
    world: ToyWorld, task: str, index: int, split: str = "train", kinds: tuple[str, ...] = CAPTION_LAYOUTS
) -> tuple[str, list, str]:
    """(prompt, images, answer) of one teaching example; describe and restate draw captions of `kinds`."""
    if task == "describe":
        s = world.caption_sample(split, index, kinds)
        return DESCRIBE, [s.image], describe(s.scene)
    if task == "restate":
        s = world.caption_sample(split, index, kinds)
        return s.caption, [], scene_to_text(s.scene)
    if task == "qa":
        s = world.qa_sample(split, index)
        return s.question, [s.image], s.answer
    if task == "edit":
        e = world.edit_sample(split, index)
        return e.instruction, [e.source_image], edit_answer(e)
    if task == "subject":
        s = world.subject_sample(split, index)
        return s.prompt, list(s.references), scene_to_text(s.target_scene)
    raise ValueError(f"unknown teaching task {task!r}; known: {list(TASKS)}")


@dataclass
class LMBatch:
    """A teaching batch: left-padded prompt + answer + end-of-turn tokens, labels only on the answer and end-of-turn,
    and the vision features of its images (computed with gradient: the vision tower learns too)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 off the answers
    feats: list[torch.Tensor]  # per image (n_i, D)
    extra: dict

    def model_kwargs(self, mllm: MLLMAdapter) -> dict:
        """The HF forward's arguments. The features go in as `inputs_embeds` (as `prepare` feeds the query slots), so
        the vision tower runs once per batch, not again inside the forward."""
        return {
            "inputs_embeds": mllm.embed(self.input_ids, self.feats),  # (B, L, D)
            "attention_mask": self.attention_mask,
            "position_ids": mllm.position_ids(self.input_ids, self.attention_mask, self.extra),
            "labels": self.labels,
        }


def lm_batch(
    mllm: MLLMAdapter,
    examples: list[tuple[str, list, str]],
    answer_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> LMBatch:
    """The batch of `examples`. With `answer_noise`, that share of the answer tokens shown to the model is another
    answer token of the batch, drawn with `rng` (the labels stay right)."""
    rows, feats, extra = mllm.tokenize([p for p, _, _ in examples], [im for _, im, _ in examples])  # with gradient
    eos = mllm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs, labels = [], []
    for row, (_, _, answer) in zip(rows, examples):
        ans = mllm.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(row + ans)
        labels.append([-100] * len(row) + ans)
    if answer_noise:
        if rng is None:
            raise ValueError("answer_noise needs an rng: the corruption must be reproducible")
        seqs = _corrupt_answers(seqs, labels, answer_noise, rng)
    ids, mask = left_pad(seqs, mllm.pad_id, 0)  # (B, L)
    lab, _ = left_pad(labels, -100, 0)  # (B, L): padding is ignored by the loss
    return LMBatch(ids.to(mllm.device), mask.to(mllm.device), lab.to(mllm.device), feats, extra)


def _corrupt_answers(
    seqs: list[list[int]], labels: list[list[int]], share: float, rng: np.random.Generator
) -> list[list[int]]:
    """Each answer token of `seqs` (where `labels` is not -100) replaced with probability `share` by an answer token
    drawn from the whole batch."""
    pool = np.asarray([t for lab in labels for t in lab if t != -100])
    out = []
    for seq, lab in zip(seqs, labels):
        hit = (np.asarray(lab) != -100) & (rng.random(len(seq)) < share)
        out.append(np.where(hit, rng.choice(pool, len(seq)), seq).tolist())
    return out


def teach(mllm: MLLMAdapter, world: ToyWorld, cfg: TeachConfig) -> list[float]:
    """Train the whole MLLM (vision tower included) on the teaching tasks, after `restate_first` text-only restate
    steps; it is frozen again at the end. Returns the mixed phase's per-step losses."""
    model = mllm.model
    model.train()
    model.requires_grad_(True)
    if cfg.restate_first:
        restate_only = tuple(float(t == "restate") for t in TASKS)
        _train(mllm, world, cfg, cfg.restate_first, restate_only, cfg.seed + 1, "teach MLLM (restate)")
    losses = _train(mllm, world, cfg, cfg.steps, cfg.weights, cfg.seed, "teach MLLM")
    freeze(model)
    return losses


def _train(
    mllm: MLLMAdapter, world: ToyWorld, cfg: TeachConfig, steps: int, weights: tuple[float, ...], seed: int, desc: str
) -> list[float]:
    """One phase: `steps` batches of tasks drawn with `weights`, its own AdamW and warmup + linear decay."""
    model = mllm.model
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.05, 1 - s / steps))
    rng = np.random.default_rng(seed)
    p = np.asarray(weights) / np.sum(weights)
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        tasks = rng.choice(len(TASKS), cfg.batch_size, p=p)
        examples = [
            example(world, TASKS[t], step * cfg.batch_size + i, kinds=cfg.caption_kinds) for i, t in enumerate(tasks)
        ]
        loss = model(**lm_batch(mllm, examples, cfg.answer_noise, rng).model_kwargs(mllm)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return losses


@torch.no_grad()
def greedy_answers(
    mllm: MLLMAdapter, world: ToyWorld, task: str, split: str, n: int, batch: int, max_new_tokens: int
) -> tuple[list[str], list[str]]:
    """The MLLM's greedy answers to the first `n` examples of a teaching task, and the answers it was taught."""
    examples = [example(world, task, i, split) for i in range(n)]
    return generate_answers(mllm, examples, batch, max_new_tokens), [want for _, _, want in examples]


@torch.no_grad()
def generate_answers(
    mllm: MLLMAdapter, examples: list[tuple[str, list, str]], batch: int, max_new_tokens: int
) -> list[str]:
    """The MLLM's greedy answers to teaching-format examples (prompt, images, answer), `batch` at a time."""
    answers: list[str] = []
    for start in range(0, len(examples), batch):
        part = examples[start : start + batch]
        images = [im for _, im, _ in part] if any(im for _, im, _ in part) else None
        answers += mllm.generate_text([p for p, _, _ in part], images, max_new_tokens=max_new_tokens)
    return answers


def task_accuracy(mllm: MLLMAdapter, world: ToyWorld, task: str, split: str, n: int = 60, batch: int = 30) -> float:
    """Greedy exact-match accuracy of the MLLM on `n` examples of one teaching task (how well it reads images,
    restates captions, applies edits), for measuring a teaching recipe."""
    answers, wants = greedy_answers(mllm, world, task, split, n, batch, max_new_tokens=40)
    return sum(a == w for a, w in zip(answers, wants)) / n


def understanding_accuracy(mllm: MLLMAdapter, world: ToyWorld, split: str, n: int = 200, batch: int = 50) -> dict:
    """Exact-match accuracy of the MLLM's answers to toy-world questions (and the answers themselves, so two runs
    can be compared sample by sample)."""
    answers, wants = greedy_answers(mllm, world, "qa", split, n, batch, max_new_tokens=4)
    correct = sum(a.strip() == w for a, w in zip(answers, wants))
    return {"accuracy": correct / n, "answers": answers}
