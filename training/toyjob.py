"""The embedded default job: `python -m training.run` with no config.

Chain (each stage reuses its output when it is already there): build the world, teach a tiny Qwen2.5-VL-class MLLM
to understand it and freeze it, train a tiny DC-AE on its images, pretrain queries + connector + a tiny Sana-class
decoder (on the DC-AE's latents; `--decoder_space=pixel` denoises RGB instead) on captions,
instruction-tune on edits and subject pairs, export a ComfyUI `models/` folder (with an `extra_model_paths.yaml` that
registers it) and the example workflows' input images (`input/`), score (GenEval-style) and write a sample grid.
Override any field with `--key=value` (e.g. `--out=/tmp/toy --pretrain_steps=300`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderDC

from metaqueries_core.checkpoint import apply_decoder_state, load_checkpoint
from metaqueries_core.comfy_files import EXTRA_MODEL_PATHS, example_inputs, write_extra_model_paths
from metaqueries_core.decoders import load_decoder
from metaqueries_core.decoders.tiny import write_tiny_sana
from metaqueries_core.file_modes import apply_umask
from metaqueries_core.mllm import load_mllm
from metaqueries_core.sampling import Guidance
from metaqueries_core.tinykit import TinySize, check_tiny_size, write_tiny_mllm
from metaqueries_core.toyworld import ToyWorld, all_text
from metaqueries_core.toyworld.world import CAPTION_LAYOUTS

from .bounds import above, at_least, within
from .config import (
    MAX_SEED,
    ConnectorSection,
    DataSection,
    ModelSection,
    OptimSection,
    RunConfig,
    TrainSection,
    check_caption_mix,
)
from .config_io import ConfigError, load_config, save_config
from .eval import evaluate, write_scores
from .toy.autoencoder import AutoencoderConfig, reconstruction_accuracy, train_autoencoder
from .toy.probe import conditioning_probe
from .toy.teach import TeachConfig, teach, understanding_accuracy

log = logging.getLogger(__name__)

MLLM_FAMILY = "qwen2_5_vl"  # the tiny MLLM's transformers family (tinykit preset)
MLLM_NAME = f"metaqueries-toy-{MLLM_FAMILY}"
DECODER_NAME = "metaqueries-toy-sana"
CHECKPOINT_NAME = "metaqueries-toy.safetensors"
COMFY_KEYS = ("LLM", "diffusers", "metaqueries")  # the model folder keys of the export (extra_model_paths.yaml)
JOB_RECORD = "toyjob.yaml"  # the resolved settings, next to models/ (python -m training.eval scores with them)
SPLITS = ("eval_seen", "eval_heldout")
SYSTEM_PROMPT = "Describe the image or caption."  # short: the toy MLLM is small and every token costs CPU time


# settings that must be >= 1, and the eval counts split half held-out, half seen (so >= 2)
_POSITIVE = (
    *("mllm_width", "mllm_layers", "teach_batch", "num_queries", "connector_depth", "ae_latent_channels"),
    *("ae_steps", "decoder_layers", "decoder_heads", "decoder_head_dim", "batch_size", "pretrain_steps"),
    *("eval_questions", "eval_samples", "eval_steps"),
)
_HALVED = ("eval_two_object", "eval_edits", "eval_subjects")
_WHY = {
    "eval_samples": " (samples per text-to-image prompt)",
    "instruct_steps": " (0 skips the instruct stage)",
    **{name: " (half from held-out, half from seen sources)" for name in _HALVED},
}


@dataclass
class ToyJobConfig:
    out: str = "outputs/toy"  # everything lands here; models/ is a ComfyUI-style models folder
    seed: int = 0
    image_size: int = 32
    # the MLLM (Qwen2.5-VL class)
    mllm_width: int = 128
    mllm_layers: int = 4
    # 800 mixed steps (was 600): greedy exact match of describing two-object images 0.31 / 0.14 -> 0.59 / 0.43 (seen /
    # held-out), editing one-object sources 0.80 / 0.65 -> 0.88 / 0.90; 1000 reads better still (0.80 / 0.67) but
    # does not fit 15 minutes next to pretraining (run G2, benchmarks/TOYWORLD.md)
    teach_steps: int = 800
    teach_restate_first: int = 200  # text-only steps first, or "right" is restated as "left" (toy/teach.py)
    teach_batch: int = 32
    teach_lr: float = 1e-3
    # half the answer tokens shown wrong while teaching (TeachConfig.answer_noise): the query slots, fixed tokens
    # after every prompt, then read the prompt's canonical restatement word by word (exact for 90 / 90 single and
    # 60 / 60 two-object eval prompts; without: 57% and 47%, two-object slots after "above" repeated the first object)
    teach_answer_noise: float = 0.5
    # weights of the teaching tasks (describe, restate, qa, edit, subject; toy/teach.py TASKS). Editing multi-object
    # scenes is the slowest lesson: the default-size MLLM edits described scenes 58 / 60 (held-out) after 6000
    # edit-only steps, 34 / 60 after 800, so longer-budget runs can weigh "edit" more (a 50-minute job with edit
    # weight 0.5 and 8000 steps: edits 0.500 / 0.333 seen / held-out, benchmarks/TOYWORLD.md)
    teach_weights: tuple[float, ...] = TeachConfig.weights
    # caption kinds of the describe and restate lessons (drawn uniformly, repeats weigh more): the natural mix plus
    # "placed_many", 2-3 objects each at its region, the form of edit targets. Without them the MLLM restated 0 / 120
    # such captions and the decoder could not learn to draw them (benchmarks/TOYWORLD.md, fourth session)
    teach_caption_kinds: tuple[str, ...] = (*CAPTION_LAYOUTS, "placed_many", "placed_many")
    # the MetaQuery head. 16 slots hold 16 answer tokens (a three-object description has 20); 24 learnt two-object
    # binding slower: all-correct 0.54 / 0.63 at 1800 pretrain steps against 0.93 / 0.93 (runs H24, H16)
    num_queries: int = 16
    # queries start as the taught MLLM's embeddings of an answer in its canonical form, cycled over the slots: the
    # last-layer state at each slot predicts the answer's next word, so the slots read colour ("a" -> colour), shape
    # ("red" -> shape) and position ("the" -> position) from the prompt. All slots "a" carried colour only
    # (single-object all-correct 0.08 -> 0.28 at patch 4); a two-object answer, whose slots also read the second
    # object, beat the single-object "a red circle on the left" (single 0.81 -> 0.90, two-object 0.07 -> 0.23 seen).
    # This works because the MLLM restates a caption in the caption's own words: taught to restate "a X to the right
    # of a Y" as "a Y to the left of a X", the slot after "to the" always predicted "left" and single-object position
    # fell from 0.99 to 0.64 (benchmarks/TOYWORLD.md, run R1)
    queries_init_text: str | None = "a red circle to the left of a blue square"
    connector_depth: int = 2
    # a learned vector per query slot on the connector output (model.connector.slot_embed): the decoder's
    # cross-attention has no positions, and the slots that say "red" for the first object and "blue" for the
    # second looked alike. With the noise-taught slots two-object 0.14 / 0.05 -> 0.42 / 0.30; either alone: no gain
    connector_slot_embed: bool = True
    # the decoder (Sana class). "latent": a DC-AE trained on the world's images first (factor 4: 8x8 latents at
    # 32x32, 64 tokens at patch 1, a third of the step time of "pixel" at patch 2, benchmarks/TOYWORLD.md).
    # "pixel": RGB directly (patch 2: 256 tokens; patch 4 drew blobs, shape 0.42 even from oracle tokens)
    decoder_space: Literal["latent", "pixel"] = "latent"
    ae_channels: tuple[int, ...] = (16, 32, 64)
    ae_latent_channels: int = 8
    ae_steps: int = 600  # ~1 minute; reconstructions score 0.985 / 0.975 (all attributes, seen / held-out)
    decoder_layers: int = 4
    decoder_heads: int = 4
    decoder_head_dim: int = 32
    decoder_patch: int | None = None  # None: 1 on latents, 2 on pixels
    # sin-cos position embeddings: released Sana has none (its 3x3 convs give position), which at 8-16 tokens a side
    # left position at chance even with oracle conditioning (0.14 -> 1.0 with them)
    decoder_pos_embed: bool = True
    # generation training
    batch_size: int = 16
    # 4.2-6.5 steps/s on 2 idle cores (latent decoder), depending on the day: 3000 + 250 steps took the whole job from
    # 12:28 (run W) to 15:53 (run F0) on the same machine. 1800 leaves the teaching steps room; two-object all-correct
    # held-out 0.70-0.95 over seeds 0-2 at 1800 with noise shift 5 (runs K, SH5s*); 2500-3000 steps reached 0.93-0.99
    # on every seed measured but do not fit 15 minutes next to teaching (benchmarks/TOYWORLD.md)
    pretrain_steps: int = 1800
    instruct_steps: int = 150
    # weights of the caption kinds in generation training (data.toyworld_caption_mix); None: the world's natural mix
    # (placed 2, relation 2, count 1, pair 1). More relations, once the slots are clean and placed: two-object
    # all-correct 0.417 / 0.300 -> 0.683 / 0.517, single unchanged (runs NS and X1). placed_many (the form of edit
    # targets, once the MLLM restates it): the decoder draws two-object edit targets from their description 0 / 30 ->
    # 24 / 30, two-object all-correct 0.98 / 0.98 (run PA, benchmarks/TOYWORLD.md)
    caption_mix: dict[str, float] | None = field(
        default_factory=lambda: {"placed": 2.0, "relation": 3.0, "count": 1.0, "pair": 1.0, "placed_many": 2.0}
    )
    # decoder training noise levels s = shift(u) (model.train_shift; 1.0: uniform). Higher trains more at high noise,
    # where the layout is decided and which object gets which shape. 3 against 1.0: seed 2's two-object all-correct
    # 0.57 / 0.39 -> 0.93 / 0.98 at 3000 steps (run R3). 5 against 3 at 1800 steps, held-out two-object per seed 0 / 1
    # / 2: 0.825 / 0.842 / 0.467 -> 0.925 / 0.700 / 0.925 (runs SH5s*, benchmarks/TOYWORLD.md, fifth session)
    train_shift: float = 5.0
    instruct_captions: float = 0.3  # share of plain captions in the instruct stage: keeps text-to-image
    # the instruct stage's learning rates as a share of pretrain's (lr, queries_lr, decoder_lr). At the full rates
    # its 250 steps undid two-object binding (all-correct 0.95 / 0.98 after pretrain -> 0.69 / 0.63) and added no
    # edit skill; at 0.1: 0.97 / 0.97 (run W's models, benchmarks/TOYWORLD.md)
    instruct_lr_scale: float = 0.1
    # pretrain: queries + connector hold still for this fraction of the steps while the fresh decoder learns to read
    # them (single-object all-correct 0.14 -> 0.28 at patch 4)
    head_hold: float = 0.3
    lr: float = 2e-3
    queries_lr: float = 1e-3
    decoder_lr: float | None = None  # None: lr
    # scoring
    eval_two_object: int = 60  # prompts (the 90 single-object prompts are always all scored)
    eval_edits: int = 60  # half from held-out, half from seen sources
    eval_subjects: int = 40
    eval_questions: int = 200  # understanding Q/A per split
    eval_samples: int = 4  # samples per text-to-image prompt (GenEval's 4): 48 held-out single-object images, not 12
    eval_steps: int = 20
    # 5 rather than 3 (same models, 4 samples per prompt): single-object all-correct 0.897 -> 0.965 seen,
    # 0.854 -> 0.958 held-out; two-object and edits unchanged (benchmarks/TOYWORLD.md, runs H and H5)
    guidance: float = 5.0
    # image guidance as strong as text guidance. In u + s_img (u_img - u) + s (c - u_img) what an edit keeps from its
    # source (the recoloured object's shape, the subject's colour and shape) is in both u_img and c, so only s_img
    # pushes it; at 1.5 kept shapes were drawn wrong. 1.5 -> 5 (s_img = s: plain guidance against black images and no
    # prompt), mean over seeds 0-2, 4 samples each: edits 0.261 / 0.156 -> 0.314 / 0.183, subject 0.488 / 0.671 ->
    # 0.629 / 0.758 (seen / held-out). 8 overshoots: one-object edits 0.41 right against 0.67 (benchmarks/TOYWORLD.md)
    image_guidance: float = 5.0
    force: bool = False  # redo every stage even when its output exists

    def __post_init__(self) -> None:
        """Every setting is checked here, before any work: a bad one is refused with what is allowed, never found
        minutes into the job (or deep inside a model)."""
        self._check_ranges()
        if self.caption_mix is not None:
            check_caption_mix(self.caption_mix)
        ToyWorld(size=self.image_size, seed=self.seed)
        check_tiny_size(MLLM_FAMILY, mllm_size(self))
        try:
            self.teach_config()
        except ValueError as err:
            raise ValueError(f"teaching (the teach_* settings): {err}") from err
        if self.decoder_space == "latent":
            self.autoencoder_config()
        factor, patch = self.decoder_factor_and_patch()
        if self.image_size % (factor * patch):
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {factor * patch}: the decoder's patch "
                f"({patch}) times the autoencoder's downsampling ({factor}; 1 on pixels)"
            )
        for stage in ("pretrain", "instruct") if self.instruct_steps else ("pretrain",):
            try:
                run_config(self, Path(self.out) / "work", stage, Path("mllm"), Path("decoder"), None)
            except ValueError as err:
                raise ValueError(f"the {stage} stage's training config refuses these settings: {err}") from err

    def _check_ranges(self) -> None:
        within("seed", self.seed, 0, MAX_SEED, why=" (numpy and torch seeds)")
        minimum = {name: 1 for name in _POSITIVE} | {name: 2 for name in _HALVED} | {"instruct_steps": 0}
        for name, low in minimum.items():
            at_least(name, getattr(self, name), low, _WHY.get(name, ""))
        for name in ("teach_lr", "lr", "queries_lr", "decoder_lr"):
            above(name, getattr(self, name), 0)
        for name in ("guidance", "image_guidance"):
            at_least(name, getattr(self, name), 0, " (1: no guidance)")
        at_least("decoder_patch", self.decoder_patch, 1, " (or None: 1 on latents, 2 on pixels)")
        within("head_hold", self.head_hold, 0.0, 1.0, high_open=True, why=" (a fraction of the pretrain steps)")
        within(
            "instruct_lr_scale", self.instruct_lr_scale, 0.0, 1.0, low_open=True, why=" (a share of pretrain's rates)"
        )
        subjects = DataSection().toyworld_subject_fraction  # the instruct stage's share of subject-driven pairs
        why = f" (a share of the instruct samples; subject-driven pairs take {subjects} and edits the rest)"
        within("instruct_captions", self.instruct_captions, 0.0, round(1.0 - subjects, 6), why=why)

    def decoder_factor_and_patch(self) -> tuple[int, int]:
        """The autoencoder's downsampling factor (1 on pixels) and the decoder's patch size."""
        latent = self.decoder_space == "latent"
        return (2 ** (len(self.ae_channels) - 1) if latent else 1), self.decoder_patch or (1 if latent else 2)

    # the fields `eval_settings` reads: how exported models are scored, not what they are
    EVAL_KEYS = (
        *("eval_two_object", "eval_edits", "eval_subjects", "eval_questions", "eval_samples", "eval_steps"),
        *("guidance", "image_guidance"),
    )

    def eval_settings(self) -> dict:
        """`training.eval.evaluate`'s keyword arguments for how many prompts of each kind, how many samples, and how
        to sample: the one place both the job's score stage and `python -m training.eval` take them from."""
        return {
            "n_two": self.eval_two_object,
            "n_edit": self.eval_edits,
            "n_subject": self.eval_subjects,
            "n_qa": self.eval_questions,
            "samples_per_prompt": self.eval_samples,
            "steps": self.eval_steps,
            "guidance": Guidance(scale=self.guidance, image_scale=self.image_guidance),
            "seed": self.seed,
        }

    def teach_config(self) -> TeachConfig:
        return TeachConfig(
            steps=self.teach_steps,
            restate_first=self.teach_restate_first,
            batch_size=self.teach_batch,
            lr=self.teach_lr,
            answer_noise=self.teach_answer_noise,
            weights=tuple(self.teach_weights),
            caption_kinds=tuple(self.teach_caption_kinds),
            seed=self.seed,
        )

    def autoencoder_config(self) -> AutoencoderConfig:
        return AutoencoderConfig(
            channels=self.ae_channels, latent_channels=self.ae_latent_channels, steps=self.ae_steps, seed=self.seed
        )


def mllm_size(cfg: ToyJobConfig) -> TinySize:
    return TinySize(
        width=cfg.mllm_width,
        layers=cfg.mllm_layers,
        heads=4,
        kv_heads=2,
        vision_width=64,
        vision_layers=2,
        patch=4,
        vocab_size=600,
    )


# What each stage's output depends on: its own settings, plus (for the training stages) the bytes of the earlier
# outputs it reads, which `claim_stage` compares by digest. A stage is reused only when both are unchanged; otherwise
# it is redone, and so is every stage after it (their inputs change).
_TRAIN = (
    *("seed", "image_size", "num_queries", "queries_init_text", "connector_depth", "connector_slot_embed"),
    *("batch_size", "lr", "queries_lr", "decoder_lr", "caption_mix", "train_shift"),
)
STAGE_SETTINGS = {
    "mllm": (
        *("seed", "image_size", "mllm_width", "mllm_layers"),
        *("teach_steps", "teach_restate_first", "teach_batch", "teach_lr", "teach_answer_noise"),
        *("teach_weights", "teach_caption_kinds"),
    ),
    "autoencoder": ("seed", "image_size", "ae_channels", "ae_latent_channels", "ae_steps"),
    "decoder_init": (
        "seed",
        "image_size",
        "mllm_width",
        "decoder_space",
        "decoder_layers",
        "decoder_heads",
        "decoder_head_dim",
        "decoder_patch",
        "decoder_pos_embed",
    ),
    "pretrain": (*_TRAIN, "pretrain_steps", "head_hold"),
    "instruct": (*_TRAIN, "instruct_steps", "instruct_captions", "instruct_lr_scale"),
}
STAMP = "toyjob_stage.json"


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, stage stamps left out)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != STAMP) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def claim_stage(cfg: ToyJobConfig, folder: Path, inputs: tuple[Path, ...] = ()) -> bool:
    """Make `folder` the stage's, for these settings and these earlier outputs (`inputs`, compared by content).
    True when it already was (finished, or stopped part-way for the trainer to resume); otherwise, or with `force`,
    whatever is there (other settings, other inputs, an older version of this job) is removed, the folder is stamped,
    and False is returned."""
    want = {k: getattr(cfg, k) for k in STAGE_SETTINGS[folder.name]}
    want.update({f"input {p.parent.name}/{p.name}": digest(p) for p in inputs})
    want = json.loads(json.dumps(want))  # as the stamp reads back (tuples are lists there)
    stamp = folder / STAMP
    had = json.loads(stamp.read_text()) if stamp.is_file() else None
    if had == want and not cfg.force:
        return True
    if folder.exists():
        changed = [k for k in want if had is None or had.get(k) != want[k]]
        why = "--force" if cfg.force else f"changed: {', '.join(changed)}" if had else "made by an older toy job"
        log.info("%s: redoing it (%s)", folder.name, why)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(json.dumps(want, indent=2))
    return False


def write_record(path: Path, t0: float, losses: list[float], results: dict) -> None:
    """A finished stage's record (its presence marks the stage done): seconds since `t0`, first and last loss, and
    its per-split results."""
    record = {"seconds": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": losses[-1], **results}
    path.write_text(json.dumps(record, indent=2))


def stage_teach(cfg: ToyJobConfig, work: Path, world: ToyWorld) -> Path:
    folder = work / "mllm"
    if claim_stage(cfg, folder) and (folder / "understanding.json").is_file():
        log.info("teach: reusing %s", folder)
        remeasure_understanding(cfg, folder, world)
        return folder
    t0 = time.perf_counter()
    write_tiny_mllm(MLLM_FAMILY, folder, size=mllm_size(cfg), texts=[*all_text(), SYSTEM_PROMPT], seed=cfg.seed)
    mllm = load_mllm(folder, system_prompt=SYSTEM_PROMPT)
    losses = teach(mllm, world, cfg.teach_config())
    mllm.model.save_pretrained(folder)
    apply_umask(folder)  # the stage's own folder (claim_stage's); save_pretrained writes weights owner-only
    acc = {split: understanding_accuracy(mllm, world, split, cfg.eval_questions) for split in SPLITS}
    write_record(folder / "understanding.json", t0, losses, acc)
    log.info(
        "teach: understanding accuracy seen %.3f, held-out %.3f",
        acc["eval_seen"]["accuracy"],
        acc["eval_heldout"]["accuracy"],
    )
    return folder


def remeasure_understanding(cfg: ToyJobConfig, folder: Path, world: ToyWorld) -> None:
    """A reused MLLM's "before" answers cover `eval_questions` questions; when that setting changed, they are
    measured again on the saved, taught MLLM (what every later stage loads frozen), so the after-training check
    compares the same questions."""
    path = folder / "understanding.json"
    record = json.loads(path.read_text())
    if all(len(record[split]["answers"]) == cfg.eval_questions for split in SPLITS):
        return
    log.info(
        "teach: measuring understanding again on %d questions per split (eval_questions changed)", cfg.eval_questions
    )
    mllm = load_mllm(folder, system_prompt=SYSTEM_PROMPT)
    record.update({split: understanding_accuracy(mllm, world, split, cfg.eval_questions) for split in SPLITS})
    path.write_text(json.dumps(record, indent=2))


def stage_autoencoder(cfg: ToyJobConfig, work: Path, world: ToyWorld) -> Path:
    folder = work / "autoencoder"
    if claim_stage(cfg, folder) and (folder / "autoencoder.json").is_file():
        log.info("autoencoder: reusing %s", folder)
        return folder
    t0 = time.perf_counter()
    ae, losses = train_autoencoder(world, cfg.autoencoder_config())
    ae.save_pretrained(folder)
    apply_umask(folder)  # as in stage_teach
    acc = {split: reconstruction_accuracy(ae, world, split) for split in SPLITS}
    write_record(folder / "autoencoder.json", t0, losses, acc)
    log.info("autoencoder: reconstructions score seen %.3f, held-out %.3f", acc["eval_seen"], acc["eval_heldout"])
    return folder


def stage_decoder_init(cfg: ToyJobConfig, work: Path, world: ToyWorld) -> Path:
    """The untrained decoder folder: a Sana-class transformer over the trained DC-AE's latents, or over pixels."""
    ae = stage_autoencoder(cfg, work, world) if cfg.decoder_space == "latent" else None
    folder = work / "decoder_init"
    if claim_stage(cfg, folder, (ae,) if ae else ()) and (folder / "model_index.json").is_file():
        return folder
    vae = AutoencoderDC.from_pretrained(ae) if ae else None
    factor, patch = cfg.decoder_factor_and_patch()
    write_tiny_sana(
        folder,
        caption_channels=cfg.mllm_width,
        sample_size=cfg.image_size // factor,
        num_layers=cfg.decoder_layers,
        num_attention_heads=cfg.decoder_heads,
        attention_head_dim=cfg.decoder_head_dim,
        patch_size=patch,
        pixel_space=vae is None,
        vae=vae,
        interpolation_scale=1.0 if cfg.decoder_pos_embed else None,
        seed=cfg.seed,
    )
    return folder


def run_config(cfg: ToyJobConfig, work: Path, stage: str, mllm: Path, decoder: Path, init: Path | None) -> RunConfig:
    pretrain = stage == "pretrain"
    steps = cfg.pretrain_steps if pretrain else cfg.instruct_steps
    scale = 1.0 if pretrain else cfg.instruct_lr_scale  # of every learning rate
    return RunConfig(
        model=ModelSection(
            mllm=str(mllm),
            decoder=str(decoder),
            init_checkpoint=str(init) if init else None,
            num_queries=cfg.num_queries,
            queries_init_text=cfg.queries_init_text,
            system_prompt=SYSTEM_PROMPT,
            max_prompt_tokens=64,
            connector=ConnectorSection(depth=cfg.connector_depth, init_std=0.02, slot_embed=cfg.connector_slot_embed),
            decoder_mode="full",
            train_shift=cfg.train_shift,
        ),
        data=DataSection(
            kind="toyworld",
            toyworld_size=cfg.image_size,
            toyworld_seed=cfg.seed,
            toyworld_caption_fraction=0.0 if pretrain else cfg.instruct_captions,  # pretraining draws captions only
            toyworld_caption_mix=cfg.caption_mix,
        ),
        optim=OptimSection(
            lr=cfg.lr * scale,
            queries_lr=cfg.queries_lr * scale,
            decoder_lr=None if cfg.decoder_lr is None else cfg.decoder_lr * scale,
            warmup_steps=min(100, steps // 10),
            head_hold_steps=int(cfg.head_hold * steps) if pretrain else 0,
            weight_decay=0.0,
            grad_clip=1.0,
        ),
        train=TrainSection(
            stage=stage,
            steps=steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            checkpoint_every=max(100, steps // 4),
            sample_every=0,
            log_every=25,
            output_dir=str(work / stage),
            guidance=cfg.guidance,
            image_guidance=cfg.image_guidance,
            sample_steps=cfg.eval_steps,
            export_name="metaquery.safetensors",
            resume=not cfg.force,
            overwrite=cfg.force,
            # at these sizes on a CPU the two-call KV-cache pass costs more than it saves (benchmarks/RESULTS.md)
            prefix_cache=False,
        ),
    )


def stage_train(cfg: ToyJobConfig, work: Path, stage: str, mllm: Path, decoder: Path, init: Path | None) -> Path:
    from .trainer import train

    export = work / stage / "metaquery.safetensors"
    inputs = (mllm / "model.safetensors", decoder) + ((init,) if init else ())
    if claim_stage(cfg, work / stage, inputs) and export.is_file():
        log.info("%s: reusing %s", stage, export)
        return export
    return train(run_config(cfg, work, stage, mllm, decoder, init))


def replace_path(new: Path, final: Path) -> None:
    """Put the finished file or folder `new` at `final`: a file in one atomic rename; a folder after moving what was
    there aside, so a kill leaves either the old or the new one complete (and at worst a `.old` copy beside it).
    What it holds gets the umask's permissions (save_pretrained writes weights owner-only, copies keep that)."""
    apply_umask(new)
    if new.is_file():
        os.replace(new, final)
        return
    old = final.with_name(final.name + ".old")
    if old.is_dir():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def stage_export(cfg: ToyJobConfig, models: Path, inputs: Path, mllm: Path, decoder_init: Path, final: Path) -> None:
    """A ComfyUI models folder: LLM/<mllm>, diffusers/<decoder with trained weights>, metaqueries/<checkpoint> and
    an extra_model_paths.yaml that registers them; and in `inputs` the images the example workflows' LoadImage nodes
    name. Each written beside its place, then moved there."""
    llm_dir, dec_dir = models / "LLM" / MLLM_NAME, models / "diffusers" / DECODER_NAME
    ckpt, extra_paths = models / "metaqueries" / CHECKPOINT_NAME, models / EXTRA_MODEL_PATHS
    images = {inputs / name: image for name, image in example_inputs(cfg.image_size).items()}
    staged = {path: path.with_name(path.name + ".new") for path in (llm_dir, dec_dir, ckpt, extra_paths, *images)}
    for path in staged.values():
        if path.is_dir():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(mllm, staged[llm_dir], ignore=shutil.ignore_patterns("understanding.json", STAMP))
    shutil.copytree(decoder_init, staged[dec_dir], ignore=shutil.ignore_patterns(STAMP))
    _, _, decoder_state = load_checkpoint(final)
    decoder = load_decoder(staged[dec_dir])
    apply_decoder_state(decoder, decoder_state)
    decoder.denoiser.save_pretrained(staged[dec_dir] / "transformer")
    shutil.copy2(final, staged[ckpt])
    write_extra_model_paths(models, COMFY_KEYS, "metaqueries_toy", path=staged[extra_paths])
    for path, image in images.items():
        image.save(staged[path], format="PNG")
    for path, new in staged.items():
        replace_path(new, path)
    log.info("export: %s, %s", models, inputs)


def load_exported(models: Path):
    """(mllm, head, decoder) from an exported models folder, checked against each other."""
    from metaqueries_core.checkpoint import check_compatible

    config, head, decoder_state = load_checkpoint(models / "metaqueries" / CHECKPOINT_NAME)
    mllm = load_mllm(models / "LLM" / MLLM_NAME, system_prompt=config.system_prompt)  # the format it was taught
    decoder = load_decoder(models / "diffusers" / DECODER_NAME)
    check_compatible(config, mllm=mllm, decoder=decoder)
    if decoder_state:
        apply_decoder_state(decoder, decoder_state)
    return mllm, head.eval(), decoder


def stage_score(cfg: ToyJobConfig, out: Path, models: Path, world: ToyWorld, teach_record: dict) -> dict:
    mllm, head, decoder = load_exported(models)
    # the frozen MLLM must answer exactly as it did right after teaching, sample by sample
    after = {split: understanding_accuracy(mllm, world, split, cfg.eval_questions) for split in SPLITS}
    scores = evaluate(
        mllm,
        head,
        decoder,
        world,
        **cfg.eval_settings(),
        grid_path=out / "samples.png",
        understanding=after,
    )
    # does the conditioning still carry each attribute? (tells a decoder-side failure from an MLLM-side one)
    scores["conditioning_probe"] = conditioning_probe(mllm, head, world)
    log.info("conditioning probe: %s", scores["conditioning_probe"])
    scores["understanding_before"] = {k: teach_record[k]["accuracy"] for k in SPLITS}
    scores["understanding_unchanged"] = all(teach_record[k]["answers"] == after[k]["answers"] for k in SPLITS)
    return scores


def run_toy_job(argv: list[str]) -> int:
    try:
        cfg = load_config(ToyJobConfig, None, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        print(f"config error: --out={cfg.out!r} is a file; give the folder the job writes into", file=sys.stderr)
        return 2
    work, models, inputs = out / "work", out / "models", out / "input"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = ToyWorld(size=cfg.image_size, seed=cfg.seed)
    mllm = stage_teach(cfg, work, world)
    decoder_init = stage_decoder_init(cfg, work, world)
    pre = stage_train(cfg, work, "pretrain", mllm, decoder_init, None)
    final = stage_train(cfg, work, "instruct", mllm, decoder_init, pre) if cfg.instruct_steps else pre
    stage_export(cfg, models, inputs, mllm, decoder_init, final)
    save_config(cfg, out / JOB_RECORD)  # what these models are: training.eval scores them with it
    teach_record = json.loads((mllm / "understanding.json").read_text())
    scores = stage_score(cfg, out, models, world, teach_record)
    scores["wall_seconds"] = time.perf_counter() - t0
    scores["config"] = asdict(cfg)
    write_scores(scores, out / "scores.json")
    done = (out / "scores.json", out / "samples.png", models, inputs)
    log.info("done in %.0f s: %s, %s, %s, %s", scores["wall_seconds"], *done)
    return 0
