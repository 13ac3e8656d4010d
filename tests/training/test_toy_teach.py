"""Teaching the toy MLLM: the text-only restate phase comes first, then the task mix; the model ends frozen."""

from __future__ import annotations

import pytest

from metaqueries_core.mllm import load_mllm
from metaqueries_core.tinykit import write_tiny_mllm
from metaqueries_core.toyworld import ToyWorld, all_text
from training.toy import teach as teach_mod
from training.toy.teach import TeachConfig, teach


def test_restate_first_then_the_mix_then_frozen(tmp_path, monkeypatch):
    mllm = load_mllm(write_tiny_mllm("qwen2_5_vl", tmp_path / "mllm", texts=list(all_text())))
    drawn: list[str] = []
    real = teach_mod.example

    def recording(world, task, index, split="train", kinds=()):
        drawn.append(task)
        assert kinds == cfg.caption_kinds
        return real(world, task, index, split, kinds)

    monkeypatch.setattr(teach_mod, "example", recording)
    cfg = TeachConfig(steps=2, restate_first=3, batch_size=4, weights=(1.0, 0.0, 1.0, 0.0, 0.0), warmup=1)
    losses = teach(mllm, ToyWorld(size=32, seed=0), cfg)
    assert len(losses) == 2  # the mixed phase's losses
    assert drawn[:12] == ["restate"] * 12
    assert set(drawn[12:]) <= {"describe", "qa"} and len(drawn) == 20
    assert not mllm.model.training and not any(p.requires_grad for p in mllm.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": (1.0, 1.0)}, "one non-negative weight per task"),
        ({"weights": (0.0,) * 5}, "not all 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"restate_first": -1}, "restate_first >= 0"),
        ({"answer_noise": 1.0}, r"answer_noise is a share of answer tokens in \[0, 1\)"),
        ({"caption_kinds": ("placed", "crowd")}, "caption_kinds: some of"),
        ({"caption_kinds": ()}, "caption_kinds: some of"),
    ],
)
def test_bad_teach_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeachConfig(**kwargs)


def test_images_are_described_in_reading_order_and_captions_restated_in_their_own():
    from metaqueries_core.toyworld import Obj, Scene, scene_to_text
    from training.toy.teach import describe

    red, blue = Obj("circle", "red", "right"), Obj("square", "blue", "left")
    low = Obj("triangle", "green", "bottom")
    # an image's description does not depend on the hidden order of its scene's objects
    three = (red, low, blue)
    assert (
        describe(Scene(three))
        == describe(Scene(three[::-1]))
        == ("a blue square on the left and a red circle on the right and a green triangle at the bottom")
    )
    assert (
        describe(Scene((red, blue), "relation", "right_of"))
        == "a blue square on the left and a red circle on the right"
    )
    # restating keeps the caption's order: the query slots read the prompt through that copy
    world = ToyWorld(size=32, seed=0)
    for i in range(20):
        prompt, images, want = teach_mod.example(world, "restate", i)
        assert images == [] and want == scene_to_text(world.caption_sample("train", i).scene)


def test_edit_answers_keep_the_sources_reading_order():
    from collections import Counter

    from metaqueries_core.toyworld import Scene, scene_to_text
    from training.toy.teach import describe, edit_answer

    world = ToyWorld(size=32, seed=0)
    edits = world.edit_samples("train", 80)
    assert {e.op for e in edits} == {"recolour", "move", "add", "remove"}
    for e in edits:
        answer, source = edit_answer(e), describe(e.source_scene).split(" and ")
        parts = answer.split(" and ")
        # the same objects as the target, whatever the order
        assert Counter(parts) == Counter(scene_to_text(Scene((o,))) for o in e.target_scene.objects)
        if e.op in ("recolour", "move"):  # one object changed where it stands in the source's description
            assert len(parts) == len(source) and sum(a != b for a, b in zip(parts, source)) == 1
        elif e.op == "add":
            assert parts[:-1] == source
        else:
            assert len(parts) == len(source) - 1 and all(p in source for p in parts)
    # a move keeps the moved object's place even where the target's reading order differs
    assert any(edit_answer(e) != describe(e.target_scene) for e in edits if e.op == "move")
    prompt, images, want = teach_mod.example(world, "edit", 3)
    assert (prompt, images[0].tobytes(), want) == (
        edits[3].instruction,
        edits[3].source_image.tobytes(),
        edit_answer(edits[3]),
    )


def test_task_accuracy_is_exact_match_of_the_teaching_answers(monkeypatch, mllm_loader):
    world, mllm = ToyWorld(size=32, seed=0), mllm_loader("qwen2_5_vl")
    truth = [teach_mod.example(world, "restate", i, "eval_seen")[2] for i in range(4)]
    answers = iter([truth[0], "wrong", truth[2], truth[3] + " extra"])
    monkeypatch.setattr(
        type(mllm), "generate_text", lambda self, prompts, images, **kw: [next(answers) for _ in prompts]
    )
    assert teach_mod.task_accuracy(mllm, world, "restate", "eval_seen", n=4, batch=2) == 0.5


def test_answer_noise_shows_wrong_answer_tokens_and_keeps_the_labels(mllm_loader):
    import numpy as np
    import torch

    world, mllm = ToyWorld(size=32, seed=0), mllm_loader("qwen2_5_vl")
    examples = [teach_mod.example(world, "restate", i) for i in range(8)]
    clean = teach_mod.lm_batch(mllm, examples)
    noisy = teach_mod.lm_batch(mllm, examples, 0.5, np.random.default_rng(0))
    again = teach_mod.lm_batch(mllm, examples, 0.5, np.random.default_rng(0))
    assert torch.equal(noisy.labels, clean.labels)  # the model still learns the right answer
    assert torch.equal(noisy.input_ids, again.input_ids)  # reproducible
    answer = clean.labels != -100
    changed = noisy.input_ids != clean.input_ids
    assert not changed[~answer].any()  # prompts are never touched
    assert 0.2 < changed[answer].float().mean() < 0.5  # ~half drawn, some draws hit the same token
    pool = set(clean.labels[answer].tolist())
    assert set(noisy.input_ids[answer].tolist()) <= pool  # wrong tokens are answer words of the batch
    with pytest.raises(ValueError, match="answer_noise needs an rng"):
        teach_mod.lm_batch(mllm, examples, 0.5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "internvl"])
def test_teaching_forward_runs_the_vision_tower_once_and_matches_the_models_own(monkeypatch, mllm_folder, family):
    """The teaching loss through `inputs_embeds` (features computed once, with gradient) is the loss of the HF
    forward that computes them itself from the pixel inputs; and the vision side gets its gradient."""
    import torch

    world, mllm = ToyWorld(size=32, seed=0), load_mllm(mllm_folder(family))  # its own copy: gradients are switched on
    examples = [teach_mod.example(world, task, i) for i, task in enumerate(["describe", "restate", "qa", "edit"] * 2)]
    model = mllm.model
    model.requires_grad_(True)
    calls = []
    real = model.model.get_image_features
    monkeypatch.setattr(model.model, "get_image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = teach_mod.lm_batch(mllm, examples)
    ours = model(**batch.model_kwargs(mllm)).loss
    assert len(calls) == 1
    theirs = model(**mllm.forward_kwargs(batch.input_ids, batch.attention_mask, batch.extra), labels=batch.labels).loss
    assert len(calls) == 2  # the model's own forward computes the features again
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.backward()
    # the gradient reaches the patch embedding, the vision tower's first layer
    patch = next(p for n, p in model.named_parameters() if "patch_embed" in n)
    assert patch.grad is not None and patch.grad.abs().sum() > 0
