"""The procedurally generated toy world: coloured shapes on a black canvas, captions, Q/A, edits, subjects.

Why a toy world: a tiny diffusion decoder and a tiny MLLM can learn it on a CPU in minutes, and every image has an
exact ground-truth scene, so generation can be scored by deterministic checks (see `scorer.py`) instead of a
detector. Everything is a pure function of a seed, so datasets are reproducible without being stored.

A scene is a tuple of `Obj(shape, colour, position)` plus a *layout* that says what its caption claims:

- ``placed``: every object is claimed at its absolute region ("a red circle on the left"),
- ``count``: n identical objects, positions unclaimed ("two blue squares"),
- ``relation``: two objects in a claimed relative position ("a green triangle above a yellow circle"); the objects
  sit in the canonical regions of the relation (above: top/bottom, left of: left/right),
- ``pair``: two objects, positions unclaimed ("a red square and a blue circle").

Positions are always concrete (they drive rendering); the layout only decides what the scorer may check.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

Rng = np.random.Generator
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixel coordinates

# Far apart in chromaticity (colour / max channel), not black: blur towards the black background keeps the
# chromaticity, so the scorer stays right on the soft edges a small diffusion model draws.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 205, 55),
    "blue": (45, 75, 235),
    "yellow": (230, 215, 35),
    "purple": (175, 55, 225),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
LAYOUTS: tuple[str, ...] = ("placed", "count", "relation", "pair")
SPLITS: tuple[str, ...] = ("train", "eval_seen", "eval_heldout")
EVAL_KINDS: tuple[str, ...] = ("single", "two_object", "count", "pair")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Region centres as fractions of the canvas (x, y); the scorer assigns a component to the nearest one.
REGION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
    "center": (0.5, 0.5),
}
# relation -> (region of the first object, region of the second object)
RELATIONS: dict[str, tuple[str, str]] = {
    "left_of": ("left", "right"),
    "right_of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
RELATION_PHRASES: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
WHERE_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "center": ("in the center", "in the middle"),
}
TO_PHRASES: dict[str, str] = {p: "to the middle" if p == "center" else f"to the {p}" for p in POSITIONS}

# Held out of every training image (any object, any layout, edit sources and targets, subject references and
# targets) and used only for evaluation: 12 of the 90 (colour, shape, position) combinations (13%). Each colour is
# held out twice, each shape four times, each position two or three times, and no (colour, shape) loses more than
# one position, so every held-out combination is a recombination of attributes seen in training.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("red", "triangle", "bottom"),
    ("green", "square", "top"),
    ("green", "circle", "center"),
    ("blue", "triangle", "right"),
    ("blue", "square", "left"),
    ("yellow", "circle", "bottom"),
    ("yellow", "triangle", "top"),
    ("purple", "square", "right"),
    ("purple", "triangle", "center"),
    ("white", "circle", "top"),
    ("white", "square", "bottom"),
)
_HELDOUT = frozenset(HELDOUT_COMBOS)

# Caption / question / instruction templates. `all_text` fills every one of them, so a tokenizer trained on it
# covers everything the world can say.
SINGLE_CAPTIONS = ("{a} {where}", "{where} there is {a}", "there is {a} {where}")
COUNT_CAPTIONS = ("{num} {colour} {noun}", "there {be} {num} {colour} {noun}")
RELATION_CAPTIONS = ("{a} {rel} {b}", "there is {a} {rel} {b}")
PAIR_CAPTIONS = ("{a} and {b}", "there is {a} and {b}")
Q_COLOUR = ("what colour is the {shape}?", "what is the colour of the {shape}?")
Q_COLOUR_AT = ("what colour is the shape {where}?",)
Q_SHAPE = ("what shape is {where}?", "which shape is {where}?")
Q_COUNT = ("how many {noun} are there?", "how many {noun} are in the image?")
Q_WHERE = ("where is the {colour} {shape}?",)
Q_EXISTS = ("is there a {colour} {shape}?",)
RECOLOUR = ("make {ref} {colour}", "change {ref} to {colour}", "paint {ref} {colour}")
MOVE = ("move {ref} {to}", "put {ref} {where}")
ADD = ("add {a} {where}", "put {a} {where}")
REMOVE = ("remove {ref}", "delete {ref}", "take away {ref}")
SUBJECT_PLACED = ("the object from the image {where}", "put the object from the image {where}")
SUBJECT_RELATION = ("the object from the image {rel} {b}",)
SUBJECT_PAIR = ("the object from the image next to {b}", "the object from the image and {b}")


@dataclass(frozen=True)
class Obj:
    """One filled shape; `position` is a canvas region name from `POSITIONS`."""

    shape: str
    colour: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.position not in POSITIONS:
            raise ValueError(f"bad object {self}")

    @property
    def combo(self) -> tuple[str, str, str]:
        """(colour, shape, position), the unit of the held-out list."""
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    """Objects plus what a caption of them claims (`layout`, and `relation` for the relation layout)."""

    objects: tuple[Obj, ...]
    layout: str = "placed"
    relation: str | None = None

    def __post_init__(self) -> None:
        objs = self.objects
        if self.layout not in LAYOUTS or not objs or len({o.position for o in objs}) != len(objs):
            raise ValueError(f"bad scene {self}")
        if (self.layout == "relation") != (self.relation is not None):
            raise ValueError("relation is required for, and only for, the relation layout")
        if self.layout == "relation" and (
            len(objs) != 2 or RELATIONS[self.relation] != (objs[0].position, objs[1].position)
        ):
            raise ValueError(f"relation {self.relation} does not match positions")
        if self.layout == "pair" and len(objs) != 2:
            raise ValueError("pair scenes have two objects")
        if self.layout == "count" and len({(o.colour, o.shape) for o in objs}) != 1:
            raise ValueError("count scenes have identical objects")

    def combos(self) -> frozenset[tuple[str, str, str]]:
        """Every (colour, shape, position) the rendered image shows."""
        return frozenset(o.combo for o in self.objects)

    def claimed_combos(self) -> frozenset[tuple[str, str, str]]:
        """The combinations a caption of this scene pins down (count and pair captions name no position)."""
        return self.combos() if self.layout in ("placed", "relation") else frozenset()

    def contains_heldout(self) -> bool:
        return bool(self.combos() & _HELDOUT)

    def claims_heldout(self) -> bool:
        return bool(self.claimed_combos() & _HELDOUT)


def _pick(options: Sequence, rng: Rng | None):
    """A random option, or the first one without an rng (canonical text for `scene_to_text`)."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _phrase(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


# ---------------------------------------------------------------- layout and rendering


def _sample_box(position: str, size: int, rng: Rng, side: int | None = None) -> Box:
    s = size / 32
    j = max(1, round(s))
    side = round(8 * s) + int(rng.integers(-j, j + 1)) if side is None else side
    fx, fy = REGION_CENTRES[position]
    cx = fx * size + int(rng.integers(-j, j + 1))
    cy = fy * size + int(rng.integers(-j, j + 1))
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    return (x0, y0, x0 + side - 1, y0 + side - 1)


def _fits(box: Box, others: Sequence[Box], size: int) -> bool:
    """On canvas, and at least `gap` empty pixels from every other box (so components never touch)."""
    gap = max(2, size // 16)
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > size - 1 or y1 > size - 1:
        return False
    return all(x1 + gap < o[0] or o[2] + gap < x0 or y1 + gap < o[1] or o[3] + gap < y0 for o in others)


def layout_scene(
    scene: Scene,
    size: int,
    rng: Rng,
    keep: Mapping[int, Box] | None = None,
    sides: Mapping[int, int] | None = None,
) -> tuple[Box, ...] | None:
    """Pixel boxes for the objects: those in `keep` stay put and those in `sides` keep their size, which is how
    edits change nothing but what the instruction names. None when no non-overlapping placement was found
    (callers then draw a new scene)."""
    boxes = dict(keep or {})
    for i, obj in enumerate(scene.objects):
        if i in boxes:
            continue
        for _ in range(30):
            box = _sample_box(obj.position, size, rng, (sides or {}).get(i))
            if _fits(box, list(boxes.values()), size):
                boxes[i] = box
                break
        else:
            return None
    return tuple(boxes[i] for i in range(len(scene.objects)))


def draw(scene: Scene, boxes: Sequence[Box], size: int) -> Image.Image:
    """Filled shapes without anti-aliasing, so every object pixel is exactly its palette colour."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    pen = ImageDraw.Draw(img)
    for obj, (x0, y0, x1, y1) in zip(scene.objects, boxes, strict=True):
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def render(scene: Scene, size: int, rng: Rng) -> Image.Image:
    """Lay out (seeded jitter) and draw a scene; raises if the scene cannot be laid out at this size."""
    for _ in range(20):
        boxes = layout_scene(scene, size, rng)
        if boxes is not None:
            return draw(scene, boxes, size)
    raise ValueError(f"cannot lay out {scene} at size {size}")


# ---------------------------------------------------------------- scenes and text


def random_scene(layout: str, rng: Rng, n: int | None = None) -> Scene:
    """A uniformly random scene of a layout (held-out filtering is the caller's job)."""
    pos = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))]
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    if layout == "placed":
        return Scene(tuple(Obj(_pick(SHAPES, rng), _pick(tuple(COLOURS), rng), pos[i]) for i in range(n or 1)))
    if layout == "count":
        colour, shape = _pick(kinds, rng)
        return Scene(tuple(Obj(shape, colour, pos[i]) for i in range(n or int(rng.integers(1, 4)))), "count")
    (ca, sa), (cb, sb) = (kinds[i] for i in rng.choice(len(kinds), 2, replace=False))
    if layout == "relation":
        rel = _pick(tuple(RELATIONS), rng)
        return Scene((Obj(sa, ca, RELATIONS[rel][0]), Obj(sb, cb, RELATIONS[rel][1])), "relation", rel)
    return Scene((Obj(sa, ca, pos[0]), Obj(sb, cb, pos[1])), "pair")


def caption(scene: Scene, rng: Rng | None = None) -> str:
    """A caption that claims exactly what the scene's layout claims, in an rng-chosen phrasing."""
    objs = scene.objects
    if scene.layout == "placed":
        parts = [
            _pick(SINGLE_CAPTIONS if len(objs) == 1 else SINGLE_CAPTIONS[:1], rng).format(
                a=_phrase(o.colour, o.shape), where=_pick(WHERE_PHRASES[o.position], rng)
            )
            for o in objs
        ]
        return " and ".join(parts)
    a, b = objs[0], objs[-1]
    if scene.layout == "count":
        noun = a.shape if len(objs) == 1 else PLURALS[a.shape]
        be = "is" if len(objs) == 1 else "are"
        return _pick(COUNT_CAPTIONS, rng).format(num=NUMBER_WORDS[len(objs)], colour=a.colour, noun=noun, be=be)
    fill = {"a": _phrase(a.colour, a.shape), "b": _phrase(b.colour, b.shape)}
    if scene.layout == "relation":
        return _pick(RELATION_CAPTIONS, rng).format(rel=RELATION_PHRASES[scene.relation], **fill)
    return _pick(PAIR_CAPTIONS, rng).format(**fill)


def scene_to_text(scene: Scene) -> str:
    """The canonical (first-template) caption: a stable, rng-free key for a scene's claims."""
    return caption(scene, None)


def questions(scene: Scene, rng: Rng | None = None) -> list[tuple[str, str]]:
    """Every question the image answers, each with a one-word answer from the closed vocabulary, rng-shuffled."""
    objs = scene.objects
    qa: list[tuple[str, str]] = []
    for shape in SHAPES:
        n = sum(o.shape == shape for o in objs)
        qa.append((_pick(Q_COUNT, rng).format(noun=PLURALS[shape]), NUMBER_WORDS[n]))
        colours = {o.colour for o in objs if o.shape == shape}
        if len(colours) == 1:
            qa.append((_pick(Q_COLOUR, rng).format(shape=shape), colours.pop()))
    for o in objs:
        where = _pick(WHERE_PHRASES[o.position], rng)
        qa.append((_pick(Q_SHAPE, rng).format(where=where), o.shape))
        qa.append((_pick(Q_COLOUR_AT, rng).format(where=where), o.colour))
        if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1:
            qa.append((Q_WHERE[0].format(colour=o.colour, shape=o.shape), o.position))
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    for (c, s), answer in ((_pick(sorted(present), rng), "yes"), (_pick(absent, rng), "no")):
        qa.append((Q_EXISTS[0].format(colour=c, shape=s), answer))
    if rng is not None:
        qa = [qa[i] for i in rng.permutation(len(qa))]
    return qa


def _refer(scene: Scene, i: int) -> str:
    """The shortest unambiguous referring expression for object i ("the circle", "the red circle", ...)."""
    o, objs = scene.objects[i], scene.objects
    if sum(p.shape == o.shape for p in objs) == 1:
        return f"the {o.shape}"
    if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1:
        return f"the {o.colour} {o.shape}"
    return f"the {o.colour} {o.shape} {WHERE_PHRASES[o.position][0]}"


def edit_with_op(scene: Scene, rng: Rng) -> tuple[str, Scene, str, int]:
    """`make_edit` plus the operation and the index of the edited object in the source (added: in the target).

    Untouched objects keep their order, so target object j is source object j except at the edited index.
    """
    objs, n = list(scene.objects), len(scene.objects)
    free = [p for p in POSITIONS if p not in {o.position for o in objs}]
    op = _pick(("recolour", "move") + (("add",) if n < 3 else ()) + (("remove",) if n > 1 else ()), rng)
    i = int(rng.integers(n))
    ref = _refer(scene, i)
    if op == "recolour":
        colour = _pick([c for c in COLOURS if c != objs[i].colour], rng)
        objs[i] = replace(objs[i], colour=colour)
        text = _pick(RECOLOUR, rng).format(ref=ref, colour=colour)
    elif op == "move":
        pos = _pick(free, rng)
        objs[i] = replace(objs[i], position=pos)
        text = _pick(MOVE, rng).format(ref=ref, to=TO_PHRASES[pos], where=_pick(WHERE_PHRASES[pos], rng))
    elif op == "add":
        new = Obj(_pick(SHAPES, rng), _pick(tuple(COLOURS), rng), _pick(free, rng))
        objs.append(new)
        i = n
        where = _pick(WHERE_PHRASES[new.position], rng)
        text = _pick(ADD, rng).format(a=_phrase(new.colour, new.shape), where=where)
    else:
        del objs[i]
        text = _pick(REMOVE, rng).format(ref=ref)
    return text, Scene(tuple(objs), "placed"), op, i


def make_edit(scene: Scene, rng: Rng) -> tuple[str, Scene]:
    """A random recolour / move / add / remove instruction for a placed scene and the scene it asks for."""
    text, target, _, _ = edit_with_op(scene, rng)
    return text, target


def subject_prompt(rng: Rng) -> tuple[str, Scene]:
    """A prompt placing "the object from the image" somewhere, and its target scene (subject = object 0)."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    (ca, sa), (cb, sb) = (kinds[i] for i in rng.choice(len(kinds), 2, replace=False))
    form = _pick(("placed", "relation", "pair"), rng)
    if form == "placed":
        pos = _pick(POSITIONS, rng)
        return _pick(SUBJECT_PLACED, rng).format(where=_pick(WHERE_PHRASES[pos], rng)), Scene((Obj(sa, ca, pos),))
    b = _phrase(cb, sb)
    if form == "relation":
        rel = _pick(tuple(RELATIONS), rng)
        target = Scene((Obj(sa, ca, RELATIONS[rel][0]), Obj(sb, cb, RELATIONS[rel][1])), "relation", rel)
        return _pick(SUBJECT_RELATION, rng).format(rel=RELATION_PHRASES[rel], b=b), target
    pa, pb = (POSITIONS[i] for i in rng.choice(len(POSITIONS), 2, replace=False))
    return _pick(SUBJECT_PAIR, rng).format(b=b), Scene((Obj(sa, ca, pa), Obj(sb, cb, pb)), "pair")


def all_text() -> Iterator[str]:
    """Every caption, question, answer, instruction and subject prompt the samples can hold (for tokenizers).

    Captions of multi-object placed scenes (only `caption` of edit scenes makes them) are "and"-joins of the
    single-object ones, so they add no new words."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    wheres = [(p, w) for p in POSITIONS for w in WHERE_PHRASES[p]]
    yield from NUMBER_WORDS + SHAPES + POSITIONS + tuple(COLOURS) + ("yes", "no")
    for (c, s), (_, w), t in itertools.product(kinds, wheres, SINGLE_CAPTIONS):
        yield t.format(a=_phrase(c, s), where=w)
    for (c, s), n, t in itertools.product(kinds, (1, 2, 3), COUNT_CAPTIONS):
        noun, be = (s, "is") if n == 1 else (PLURALS[s], "are")
        yield t.format(num=NUMBER_WORDS[n], colour=c, noun=noun, be=be)
    for (ka, kb), rel in itertools.product(itertools.permutations(kinds, 2), (*RELATION_PHRASES.values(), None)):
        a, b = _phrase(*ka), _phrase(*kb)
        yield from (t.format(a=a, b=b, rel=rel) for t in (RELATION_CAPTIONS if rel else PAIR_CAPTIONS))
    for s in SHAPES:
        yield from (t.format(noun=PLURALS[s]) for t in Q_COUNT)
        yield from (t.format(shape=s) for t in Q_COLOUR)
    for _, w in wheres:
        yield from (t.format(where=w) for t in Q_SHAPE + Q_COLOUR_AT + SUBJECT_PLACED)
    refs = [f"the {s}" for s in SHAPES] + [f"the {c} {s}" for c, s in kinds]
    refs += [f"the {c} {s} {WHERE_PHRASES[p][0]}" for (c, s), p in itertools.product(kinds, POSITIONS)]
    for (c, s), rel in itertools.product(kinds, RELATION_PHRASES.values()):
        yield from (t.format(colour=c, shape=s) for t in Q_WHERE + Q_EXISTS)
        yield from (t.format(rel=rel, b=_phrase(c, s)) for t in SUBJECT_RELATION)
        yield from (t.format(b=_phrase(c, s)) for t in SUBJECT_PAIR)
    for ref in refs:
        yield from (t.format(ref=ref) for t in REMOVE)
        yield from (t.format(ref=ref, colour=c) for t, c in itertools.product(RECOLOUR, COLOURS))
        for p, w in wheres:
            yield from (t.format(ref=ref, to=TO_PHRASES[p], where=w) for t in MOVE)
    for (c, s), (_, w), t in itertools.product(kinds, wheres, ADD):
        yield t.format(a=_phrase(c, s), where=w)


VOCAB_WORDS: tuple[str, ...] = tuple(sorted({w.rstrip("?") for t in all_text() for w in t.split()} | {"?"}))


# ---------------------------------------------------------------- datasets


@dataclass(frozen=True)
class CaptionSample:
    image: Image.Image
    caption: str
    scene: Scene
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class QASample:
    image: Image.Image
    question: str
    answer: str
    scene: Scene


@dataclass(frozen=True)
class EditSample:
    source_image: Image.Image
    instruction: str
    target_image: Image.Image
    source_scene: Scene
    target_scene: Scene
    op: str  # recolour | move | add | remove
    index: int  # edited object: in the source, or in the target for "add"
    source_boxes: tuple[Box, ...]
    target_boxes: tuple[Box, ...]


@dataclass(frozen=True)
class SubjectSample:
    references: tuple[Image.Image, ...]  # the subject alone, each at its own region
    prompt: str
    target_image: Image.Image
    target_scene: Scene  # subject = objects[0]
    reference_scenes: tuple[Scene, ...]


@dataclass(frozen=True)
class EvalPrompt:
    kind: str
    prompt: str
    scene: Scene  # ground truth to score a generated image against
    heldout: bool  # the prompt claims a held-out (colour, shape, position)


_KIND_IDS = {"caption": 1, "qa": 2, "edit": 3, "subject": 4}  # 5: eval prompts
_MAX_TRIES = 10_000  # rejection sampling accepts within a few tries; running out is a bug, not bad luck


def _exhausted() -> RuntimeError:
    return RuntimeError("toy world rejection sampling found nothing: the held-out filter or the layout is broken")


# What a caption can describe: a scene layout, or "placed_many", a placed scene of 2-3 objects each claimed at its
# region ("a red circle on the left and a blue square at the top"), the form of the scenes edits produce
CAPTION_KINDS: tuple[str, ...] = (*LAYOUTS, "placed_many")
CAPTION_LAYOUTS = ("placed", "placed", "count", "relation", "relation", "pair")  # the natural mix


class ToyWorld:
    """Seeded sample streams. Item `index` of a stream depends only on (seed, kind, split, index), so streams are
    prefix-stable and random-access, and `train` / `eval_seen` / `eval_heldout` never share an rng stream.

    `train` and `eval_seen` never show a held-out combination in any image. `eval_heldout` items always involve one:
    caption / Q/A images show one; edit and subject targets (what a model must generate) claim one.
    `eval_seen` comes from the training distribution, so it can repeat training items: the world is small.
    """

    def __init__(self, size: int = 32, seed: int = 0) -> None:
        if size < 32:
            raise ValueError("size must be at least 32 (objects are 8 px at 32)")
        self.size, self.seed = size, seed

    def _rng(self, kind: str, split: str, index: int) -> Rng:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.random.default_rng([self.seed, _KIND_IDS[kind], SPLITS.index(split), index])

    def _layout(self, scene: Scene, rng: Rng, keep: Mapping[int, Box] | None = None, **kw) -> tuple[Box, ...] | None:
        return layout_scene(scene, self.size, rng, keep, **kw)

    def _accept(self, split: str, scenes: Sequence[Scene], target: Scene, claimed: bool) -> bool:
        if split != "eval_heldout":
            return not any(s.contains_heldout() for s in scenes)
        return target.claims_heldout() if claimed else target.contains_heldout()

    def caption_sample(self, split: str, index: int, kinds: Sequence[str] = CAPTION_LAYOUTS) -> CaptionSample:
        """Item `index` of a split's captions; its kind (`CAPTION_KINDS`) is drawn uniformly from `kinds` (repeats
        weigh more)."""
        if unknown := set(kinds) - set(CAPTION_KINDS):
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; expected some of {list(CAPTION_KINDS)}")
        rng = self._rng("caption", split, index)
        for _ in range(_MAX_TRIES):
            kind = _pick(tuple(kinds), rng)
            many = kind == "placed_many"
            scene = random_scene("placed", rng, n=int(rng.integers(2, 4))) if many else random_scene(kind, rng)
            boxes = self._layout(scene, rng)
            if boxes is not None and self._accept(split, [scene], scene, claimed=False):
                return CaptionSample(draw(scene, boxes, self.size), caption(scene, rng), scene, boxes)
        raise _exhausted()

    def qa_sample(self, split: str, index: int) -> QASample:
        rng = self._rng("qa", split, index)
        for _ in range(_MAX_TRIES):
            scene = random_scene(_pick(CAPTION_LAYOUTS, rng), rng)
            boxes = self._layout(scene, rng)
            if boxes is not None and self._accept(split, [scene], scene, claimed=False):
                question, answer = _pick(questions(scene, rng), rng)
                return QASample(draw(scene, boxes, self.size), question, answer, scene)
        raise _exhausted()

    def edit_sample(self, split: str, index: int) -> EditSample:
        rng = self._rng("edit", split, index)
        for _ in range(_MAX_TRIES):
            source = random_scene("placed", rng, n=_pick((1, 1, 2, 2, 3), rng))
            text, target, op, i = edit_with_op(source, rng)
            if not self._accept(split, [source, target], target, claimed=True):
                continue
            src_boxes = self._layout(source, rng)
            if src_boxes is None:
                continue
            keep = dict(enumerate(src_boxes))
            if op == "remove":
                keep = dict(enumerate(b for j, b in enumerate(src_boxes) if j != i))
            elif op in ("move", "add"):
                keep.pop(i, None)
            sides = {i: src_boxes[i][2] - src_boxes[i][0] + 1} if op == "move" else None
            tgt_boxes = self._layout(target, rng, keep, sides=sides)
            if tgt_boxes is not None:
                src_img, tgt_img = draw(source, src_boxes, self.size), draw(target, tgt_boxes, self.size)
                return EditSample(src_img, text, tgt_img, source, target, op, i, src_boxes, tgt_boxes)
        raise _exhausted()

    def subject_sample(self, split: str, index: int, n_refs: int = 1) -> SubjectSample:
        rng = self._rng("subject", split, index)
        for _ in range(_MAX_TRIES):
            prompt, target = subject_prompt(rng)
            subj = target.objects[0]
            refs = [Scene((replace(subj, position=_pick(POSITIONS, rng)),)) for _ in range(n_refs)]
            if not self._accept(split, [target, *refs], target, claimed=True):
                continue
            boxes = [self._layout(s, rng) for s in (target, *refs)]
            if all(b is not None for b in boxes):
                images = [draw(s, b, self.size) for s, b in zip((target, *refs), boxes)]
                return SubjectSample(tuple(images[1:]), prompt, images[0], target, tuple(refs))
        raise _exhausted()

    def caption_samples(self, split: str, n: int, start: int = 0) -> list[CaptionSample]:
        return [self.caption_sample(split, i) for i in range(start, start + n)]

    def qa_samples(self, split: str, n: int, start: int = 0) -> list[QASample]:
        return [self.qa_sample(split, i) for i in range(start, start + n)]

    def edit_samples(self, split: str, n: int, start: int = 0) -> list[EditSample]:
        return [self.edit_sample(split, i) for i in range(start, start + n)]

    def subject_samples(self, split: str, n: int, start: int = 0, n_refs: int = 1) -> list[SubjectSample]:
        return [self.subject_sample(split, i, n_refs) for i in range(start, start + n)]

    def eval_prompts(self, kind: str, n: int | None = None) -> list[EvalPrompt]:
        """Text-to-image evaluation prompts with ground-truth scenes.

        single: all 90 (colour, shape, position) placements, 12 of them held out; count: all 54 (colour, shape,
        number); two_object: `n` (default 120) relation prompts, alternately seen and held out; pair: `n` (default 60)
        "a X and a Y" prompts. Count and pair prompts claim no position, so none of them is held out. Scenes of
        unclaimed positions avoid held-out combinations, so their ground-truth renders are training-like.
        """
        if kind not in EVAL_KINDS:
            raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
        if kind == "single":
            specs: list = list(itertools.product(COLOURS, SHAPES, POSITIONS))
        elif kind == "count":
            specs = list(itertools.product(COLOURS, SHAPES, (1, 2, 3)))
        else:
            specs = list(range(n or {"two_object": 120, "pair": 60}[kind]))
        out: list[EvalPrompt] = []
        for i, spec in enumerate(specs):
            rng = np.random.default_rng([self.seed, 5, EVAL_KINDS.index(kind), i])
            want_heldout = spec in _HELDOUT if kind == "single" else kind == "two_object" and i % 2 == 1
            for _ in range(_MAX_TRIES):
                if kind == "single":
                    scene = Scene((Obj(spec[1], spec[0], spec[2]),))
                elif kind == "count":
                    pos = [POSITIONS[j] for j in rng.permutation(len(POSITIONS))[: spec[2]]]
                    scene = Scene(tuple(Obj(spec[1], spec[0], p) for p in pos), "count")
                else:
                    scene = random_scene("relation" if kind == "two_object" else "pair", rng)
                if scene.contains_heldout() == want_heldout and self._layout(scene, rng) is not None:
                    out.append(EvalPrompt(kind, caption(scene, rng), scene, scene.claims_heldout()))
                    break
            else:
                raise _exhausted()
        return out
