"""Toy world and scorer: determinism, the held-out guarantee, edit semantics, and the scorer's own accuracy
(ground truth ~100 %, mismatched scenes exactly at their true agreement rate, noise + blur >= 95 %)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from metaqueries_core.toyworld import (
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    SHAPES,
    VOCAB_WORDS,
    Obj,
    Scene,
    ToyWorld,
    all_text,
    caption,
    classify_shape,
    detect,
    draw,
    make_edit,
    questions,
    random_scene,
    render,
    scene_to_text,
    score_edit,
    score_image,
    score_subject,
    summarise,
)
from metaqueries_core.toyworld.world import _refer

KEYS = ("colour", "shape", "position", "count", "all", "exact", "heldout_drawn")  # the last: held-out relations


def _texts_and_bytes(world: ToyWorld, split: str = "train", n: int = 12) -> list:
    out: list = []
    for s in world.caption_samples(split, n):
        out += [s.image.tobytes(), s.caption]
    for s in world.qa_samples(split, n):
        out += [s.image.tobytes(), s.question, s.answer]
    for s in world.edit_samples(split, n):
        out += [s.source_image.tobytes(), s.instruction, s.target_image.tobytes()]
    for s in world.subject_samples(split, n, n_refs=2):
        out += [r.tobytes() for r in s.references] + [s.prompt, s.target_image.tobytes()]
    return out + [p.prompt for p in world.eval_prompts("two_object", 10)]


def _all_scenes(world: ToyWorld, split: str, n: int) -> list[Scene]:
    scenes = [s.scene for s in world.caption_samples(split, n)] + [s.scene for s in world.qa_samples(split, n)]
    for s in world.edit_samples(split, n):
        scenes += [s.source_scene, s.target_scene]
    for s in world.subject_samples(split, n, n_refs=2):
        scenes += [s.target_scene, *s.reference_scenes]
    return scenes


def _accuracy(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {k: v for k, v in summarise((r, False) for r in rows)["overall"].items() if k != "n"}


# ---------------------------------------------------------------- world


@pytest.mark.parametrize("size", [32, 64])
def test_same_seed_gives_identical_bytes_and_text(size):
    assert _texts_and_bytes(ToyWorld(size, seed=3)) == _texts_and_bytes(ToyWorld(size, seed=3))


def test_different_seed_or_split_differs_and_streams_are_prefix_stable():
    a = _texts_and_bytes(ToyWorld(32, seed=0))
    assert a != _texts_and_bytes(ToyWorld(32, seed=1))
    assert a != _texts_and_bytes(ToyWorld(32, seed=0), split="eval_seen")
    w = ToyWorld(32, seed=0)
    ten = [s.caption for s in w.caption_samples("train", 10)]
    assert ten[:4] == [s.caption for s in w.caption_samples("train", 4)]
    assert ten[6:] == [s.caption for s in w.caption_samples("train", 4, start=6)]
    assert len(set(ten)) > 5


def test_heldout_list_is_a_recombination_of_seen_attributes():
    combos = set(itertools.product(COLOURS, SHAPES, POSITIONS))
    held = set(HELDOUT_COMBOS)
    assert held <= combos and len(held) == len(HELDOUT_COMBOS)
    assert 0.10 <= len(held) / len(combos) <= 0.15
    seen = combos - held
    for c, s, p in held:
        assert any(x[:2] == (c, s) for x in seen)  # the object is seen elsewhere
        assert any(x[0] == c and x[2] == p for x in seen) and any(x[1:] == (s, p) for x in seen)
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {x[i] for x in held} == set(values)


def test_heldout_combos_never_appear_in_training_splits():
    w = ToyWorld(32, seed=0)
    for split in ("train", "eval_seen"):
        scenes = _all_scenes(w, split, 1000)
        assert len(scenes) >= 6000
        assert not [s for s in scenes if s.contains_heldout()]
        assert {c for s in scenes for c in s.combos()} == set(itertools.product(COLOURS, SHAPES, POSITIONS)) - set(
            HELDOUT_COMBOS
        )
    # the filter is not vacuous: unfiltered scenes hit held-out combinations often
    rng = np.random.default_rng(0)
    assert sum(random_scene("pair", rng).contains_heldout() for _ in range(500)) > 50


def test_eval_heldout_samples_involve_a_heldout_combo():
    w = ToyWorld(32, seed=0)
    assert all(s.scene.contains_heldout() for s in w.caption_samples("eval_heldout", 300))
    assert all(s.scene.contains_heldout() for s in w.qa_samples("eval_heldout", 300))
    assert all(s.target_scene.claims_heldout() for s in w.edit_samples("eval_heldout", 300))
    assert all(s.target_scene.claims_heldout() for s in w.subject_samples("eval_heldout", 300))


def test_eval_prompts():
    w = ToyWorld(32, seed=0)
    single = w.eval_prompts("single")
    assert len(single) == 90 and len({p.prompt for p in single}) == 90
    assert {p.scene.objects[0].combo for p in single if p.heldout} == set(HELDOUT_COMBOS)
    two = w.eval_prompts("two_object")
    assert len(two) == 120 and sum(p.heldout for p in two) == 60
    assert all(p.heldout == p.scene.claims_heldout() and p.scene.layout == "relation" for p in two)
    count = w.eval_prompts("count")
    assert len(count) == 54 and not any(p.heldout or p.scene.contains_heldout() for p in count)
    assert Counter(len(p.scene.objects) for p in count) == {1: 18, 2: 18, 3: 18}
    assert len(w.eval_prompts("pair", 7)) == 7
    assert [p.prompt for p in two] == [p.prompt for p in ToyWorld(32, seed=0).eval_prompts("two_object")]
    with pytest.raises(ValueError):
        w.eval_prompts("nope")


def test_caption_phrasings_and_canonical_text():
    def phrasings(scene: Scene) -> set[str]:
        return {caption(scene, np.random.default_rng(i)) for i in range(60)}

    one = Scene((Obj("circle", "red", "left"),))
    assert {"a red circle on the left", "a red circle at the left", "on the left there is a red circle"} <= phrasings(
        one
    )
    assert scene_to_text(one) == "a red circle on the left"
    two = Scene((Obj("square", "blue", "left"), Obj("square", "blue", "top")), "count")
    assert {"two blue squares", "there are two blue squares"} == phrasings(two)
    above = Scene((Obj("triangle", "green", "top"), Obj("circle", "yellow", "bottom")), "relation", "above")
    assert "a green triangle above a yellow circle" in phrasings(above)
    left = Scene((Obj("square", "red", "left"), Obj("circle", "blue", "right")), "relation", "left_of")
    assert scene_to_text(left) == "a red square to the left of a blue circle"
    pair = Scene((Obj("square", "red", "top"), Obj("circle", "blue", "center")), "pair")
    assert scene_to_text(pair) == "a red square and a blue circle"


def test_scene_validation():
    with pytest.raises(ValueError):
        Obj("hexagon", "red", "left")
    with pytest.raises(ValueError):  # two objects in one region
        Scene((Obj("circle", "red", "left"), Obj("square", "blue", "left")))
    with pytest.raises(ValueError):  # relation that contradicts the positions
        Scene((Obj("circle", "red", "left"), Obj("square", "blue", "right")), "relation", "above")
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red", "left"), Obj("square", "blue", "right")), "count")


def test_questions_answer_from_the_scene():
    scene = Scene((Obj("circle", "red", "left"), Obj("square", "blue", "right"), Obj("square", "blue", "top")))
    qa = dict(questions(scene))
    assert qa["what colour is the circle?"] == "red"
    assert qa["what colour is the square?"] == "blue"
    assert qa["what shape is on the left?"] == "circle"
    assert qa["how many squares are there?"] == "two"
    assert qa["how many triangles are there?"] == "zero"
    assert qa["where is the red circle?"] == "left"
    assert "where is the blue square?" not in qa  # ambiguous: two blue squares
    assert qa["is there a blue square?"] == "yes" and "no" in qa.values()
    assert sorted(questions(scene, np.random.default_rng(0))) != sorted(questions(scene))  # phrasing varies


def test_every_sample_string_comes_from_all_text():
    text = set(all_text())
    vocab = set(VOCAB_WORDS)
    w = ToyWorld(32, seed=0)
    strings = [s.caption for s in w.caption_samples("train", 300)]
    strings += [x for s in w.qa_samples("eval_heldout", 300) for x in (s.question, s.answer)]
    strings += [s.instruction for s in w.edit_samples("train", 300)]
    strings += [s.prompt for s in w.subject_samples("train", 300)] + [p.prompt for p in w.eval_prompts("single")]
    assert set(strings) <= text
    assert {t.rstrip("?") for s in strings for t in s.split()} <= vocab
    assert len(vocab) < 80  # small and closed, for a tiny tokenizer


def test_render_uses_pure_palette_colours_and_never_overlaps():
    w = ToyWorld(32, seed=0)
    palette = {(0, 0, 0), *COLOURS.values()}
    for s in w.caption_samples("train", 200):
        arr = np.asarray(s.image)
        assert {tuple(int(v) for v in px) for px in arr.reshape(-1, 3)} <= palette
        assert len(detect(s.image)) == len(s.scene.objects)
    rng = np.random.default_rng(0)
    img = render(Scene((Obj("triangle", "white", "center"),)), 64, rng)
    assert img.size == (64, 64) and img.mode == "RGB"


def test_edits_change_exactly_what_the_instruction_says():
    w = ToyWorld(32, seed=0)
    samples = w.edit_samples("train", 400)
    assert set(Counter(s.op for s in samples)) == {"recolour", "move", "add", "remove"}
    for s in samples:
        src, tgt, i = list(s.source_scene.objects), list(s.target_scene.objects), s.index
        sb, tb = list(s.source_boxes), list(s.target_boxes)
        changed = np.any(np.asarray(s.source_image) != np.asarray(s.target_image), axis=2)
        allowed = np.zeros_like(changed)
        if s.op == "recolour":
            assert [o.colour for o in tgt] != [o.colour for o in src] and tb == sb
            assert [(o.shape, o.position) for o in tgt] == [(o.shape, o.position) for o in src]
            assert tgt[:i] + tgt[i + 1 :] == src[:i] + src[i + 1 :] and s.instruction.endswith(tgt[i].colour)
            regions = [sb[i]]
        elif s.op == "move":
            assert (tgt[i].shape, tgt[i].colour) == (src[i].shape, src[i].colour) and tgt[i].position != src[i].position
            assert tgt[:i] + tgt[i + 1 :] == src[:i] + src[i + 1 :] and tb[:i] + tb[i + 1 :] == sb[:i] + sb[i + 1 :]
            assert tb[i][2] - tb[i][0] == sb[i][2] - sb[i][0]  # moved, not resized
            regions = [sb[i], tb[i]]
        elif s.op == "add":
            assert tgt[:-1] == src and tb[:-1] == sb and i == len(src)
            assert f"a {tgt[i].colour} {tgt[i].shape}" in s.instruction
            regions = [tb[i]]
        else:
            assert tgt == src[:i] + src[i + 1 :] and tb == sb[:i] + sb[i + 1 :]
            regions = [sb[i]]
        if s.op != "add":
            assert _refer(s.source_scene, i) in s.instruction
        for x0, y0, x1, y1 in regions:
            allowed[y0 : y1 + 1, x0 : x1 + 1] = True
        assert changed.any() and not (changed & ~allowed).any()
        assert not s.source_scene.contains_heldout() and not s.target_scene.contains_heldout()
    text, target = make_edit(Scene((Obj("circle", "red", "left"),)), np.random.default_rng(0))
    assert isinstance(text, str) and target.layout == "placed"


def test_referring_expressions_are_unambiguous():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene("placed", rng, n=3)
        for i, obj in enumerate(scene.objects):
            words = _refer(scene, i).split()[1:]
            matches = [
                o
                for o in scene.objects
                if o.shape == words[-1 if len(words) < 3 else 1]
                and (len(words) == 1 or o.colour == words[0])
                and (len(words) < 3 or o.position == words[-1])
            ]
            assert matches == [obj]


# ---------------------------------------------------------------- scorer


@pytest.mark.parametrize("inverted", [False, True])
def test_shape_classifier_at_many_sizes(inverted):
    for side, shape in itertools.product(range(5, 33, 3), SHAPES):
        img = draw(Scene((Obj(shape, "green", "center"),)), [(8, 8, 7 + side, 7 + side)], 64)
        if inverted:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        mask = np.asarray(img).max(axis=2) > 0
        assert classify_shape(mask) == shape, (side, shape)
        if side >= 8:  # blurred and scored end to end
            assert [c.shape for c in detect(img.filter(ImageFilter.GaussianBlur(1)))] == [shape]


def test_detect_ignores_specks_and_splits_touching_colours():
    img = Image.new("RGB", (32, 32))
    pen = ImageDraw.Draw(img)
    pen.rectangle((4, 4, 11, 11), fill=COLOURS["red"])
    pen.rectangle((12, 4, 19, 11), fill=COLOURS["blue"])  # touches the red one
    pen.point([(28, 28), (2, 28), (29, 3)], fill=COLOURS["white"])
    assert sorted((c.colour, c.shape) for c in detect(img)) == [("blue", "square"), ("red", "square")]


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_is_right_on_ground_truth(size):
    w = ToyWorld(size, seed=1)
    rows = [score_image(s.image, s.scene) for s in w.caption_samples("train", 300)]
    rows += [score_image(s.image, s.scene) for s in w.caption_samples("eval_heldout", 60)]
    acc = _accuracy(rows)
    assert set(acc) == set(KEYS) and min(acc.values()) >= 0.99, acc
    edits = [score_edit(s.target_image, s.target_scene) for s in w.edit_samples("train", 100)]
    subjects = [score_subject(s.target_image, s.target_scene) for s in w.subject_samples("train", 100)]
    assert min(_accuracy(edits).values()) >= 0.99 and min(_accuracy(subjects).values()) >= 0.99
    for p in w.eval_prompts("single") + w.eval_prompts("two_object", 40):
        assert score_image(render(p.scene, size, np.random.default_rng(0)), p.scene)["all"], p.prompt


def test_exact_fails_an_extra_object_that_all_lets_pass():
    w = ToyWorld(32, seed=0)
    p = next(q for q in w.eval_prompts("single") if q.scene.objects[0].position == "left")
    img = render(p.scene, 32, np.random.default_rng(0))
    assert score_image(img, p.scene)["exact"]
    ImageDraw.Draw(img).rectangle(
        (22, 22, 28, 28), fill=COLOURS["green" if p.scene.objects[0].colour != "green" else "red"]
    )
    scores = score_image(img, p.scene)
    assert scores["all"] and not scores["exact"]


def test_heldout_relation_prompts_report_whether_the_heldout_combination_was_drawn():
    """A relation holds wherever the pair stands, so "all" can pass a held-out relation prompt with seen
    combinations only; `heldout_drawn` tells the two apart (and is absent for prompts that claim none)."""
    from metaqueries_core.toyworld.world import HELDOUT_COMBOS, POSITIONS, Scene

    w, rng = ToyWorld(32, seed=0), np.random.default_rng(0)
    prompts = w.eval_prompts("two_object", 40)
    seen = next(p for p in prompts if not p.heldout)
    assert "heldout_drawn" not in score_image(render(seen.scene, 32, rng), seen.scene)
    detours = 0
    for p in (q for q in prompts if q.heldout):
        assert score_image(render(p.scene, 32, rng), p.scene)["heldout_drawn"]  # the canonical layout draws it
        a, b = p.scene.objects
        for ra, rb in itertools.permutations(POSITIONS, 2):
            moved = Scene((replace(a, position=ra), replace(b, position=rb)))
            if moved.combos() & set(HELDOUT_COMBOS):
                continue
            scores = score_image(render(moved, 32, rng), p.scene)
            if scores["all"]:  # right by the relation, without the held-out combination
                assert not scores["heldout_drawn"], (p.prompt, ra, rb)
                detours += 1
    assert detours > 0


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_on_mismatched_scenes_matches_true_agreement(size):
    # One object per image: the scorer must say exactly whether the claimed attribute happens to match.
    prompts = ToyWorld(size).eval_prompts("single")
    images = [render(p.scene, size, np.random.default_rng(i)) for i, p in enumerate(prompts)]
    perm = np.random.default_rng(0).permutation(len(prompts))
    rows, truth = [], []
    for img_i, scene_i in enumerate(perm):
        got, want = prompts[img_i].scene.objects[0], prompts[scene_i].scene.objects[0]
        rows.append(score_image(images[img_i], prompts[scene_i].scene))
        same = (got.colour == want.colour, got.shape == want.shape, got.position == want.position)
        assert (rows[-1]["colour"], rows[-1]["shape"], rows[-1]["position"]) == same
        truth.append(same)
    acc = _accuracy(rows)  # chance: colour 1/6, shape 1/3, position 1/5, all 1/90
    assert acc["colour"] < 0.3 and acc["shape"] < 0.5 and acc["position"] < 0.35 and acc["all"] < 0.05
    # Mixed layouts (1-3 objects, counts, relations): the image is scored against another sample's scene.
    samples = ToyWorld(size, seed=2).caption_samples("train", 300)
    mixed = _accuracy([score_image(samples[i].image, samples[(i + 7) % 300].scene) for i in range(300)])
    assert mixed["all"] < 0.1 and mixed["colour"] < 0.3 and mixed.get("count", 0) < 0.4, mixed


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_is_robust_to_noise_blur_and_off_colours(size):
    rng = np.random.default_rng(0)
    samples = ToyWorld(size, seed=4).caption_samples("train", 300)
    rows = []
    for s in samples:
        blurred = np.asarray(s.image.filter(ImageFilter.GaussianBlur(size / 32)), dtype=np.float64)
        tint = rng.uniform(0.75, 1.0) * rng.uniform(0.9, 1.1, size=3)  # dimmer, slightly off palette
        noisy = blurred * tint + rng.normal(0.0, 20.0, blurred.shape)
        rows.append(score_image(np.clip(noisy, 0, 255).astype(np.uint8), s.scene))
    acc = _accuracy(rows)
    assert min(acc.values()) >= 0.95, acc


def test_score_edit_fails_unedited_source_and_score_subject_checks_placement():
    w = ToyWorld(32, seed=0)
    for s in w.edit_samples("train", 100):
        res = score_edit(s.source_image, s.target_scene)
        key = {"recolour": "colour", "move": "position", "add": "count", "remove": "count"}[s.op]
        assert not res[key] and not res["all"], (s.instruction, res)
    for s in w.subject_samples("train", 100):
        assert score_subject(s.target_image, s.target_scene)["all"]
        ref = s.reference_scenes[0].objects[0]
        res = score_subject(s.references[0], s.target_scene)
        assert res["subject"]  # the reference shows the subject ...
        if s.target_scene.layout == "placed":  # ... but not where the prompt puts it (unless by chance)
            assert res["position"] == (ref.position == s.target_scene.objects[0].position)
        else:
            assert not res["context"]  # and it lacks the other object
    wrong = Scene((Obj("circle", "red", "left"),))
    img = render(Scene((Obj("circle", "blue", "left"),)), 32, np.random.default_rng(0))
    assert score_subject(img, wrong) == {
        "subject": False,
        "colour": False,
        "shape": True,
        "position": True,
        "all": False,
    }


def test_summarise_splits_seen_and_heldout():
    out = summarise(
        [({"colour": True, "all": True}, False), ({"colour": False, "all": False}, True), ({"count": True}, True)]
    )
    assert out["overall"] == {"n": 3.0, "all": 0.5, "colour": 0.5, "count": 1.0}
    assert out["seen"]["colour"] == 1.0 and out["heldout"]["colour"] == 0.0 and out["heldout"]["n"] == 2.0
