"""The training data of a run: the offline toy world (default) or one of the on-disk formats in `training.data`."""

from __future__ import annotations

import numpy as np

from metaqueries_core.toyworld import ToyWorld

from .config import FORMAT_OPTIONS, RunConfig
from .data import IndexedDataset, open_dataset
from .data.samples import CaptionSample, InstructSample, Sample

TOY_ROWS = 1_000_000  # a virtual length: every row is generated on demand from (seed, index)


class ToyWorldData(IndexedDataset):
    """Training split of the toy world as a dataset: captions (pretrain), edits and subject pairs (instruct).
    Held-out combinations never appear here (the world guarantees it for the train split)."""

    def data_files(self) -> list[str]:
        return []  # drawn from the data.toyworld_* settings and the seed: no files

    def __init__(
        self,
        world: ToyWorld,
        stage: str,
        *,
        subject_fraction: float = 0.3,
        caption_fraction: float = 0.0,
        caption_mix: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(f"toyworld(size={world.size}, seed={world.seed})", stage, shuffle=False, **kwargs)
        self.world = world
        self.subject_fraction = subject_fraction
        self.caption_fraction = caption_fraction
        self.caption_mix = caption_mix

    def _caption(self, row: int, rng: np.random.Generator):
        """A train caption: of the world's natural mix, or of a kind drawn with the `caption_mix` weights."""
        if self.caption_mix is None:
            return self.world.caption_sample("train", row)
        kinds, weights = zip(*self.caption_mix.items())
        kind = kinds[rng.choice(len(kinds), p=np.asarray(weights) / sum(weights))]
        return self.world.caption_sample("train", row, (kind,))

    @property
    def num_rows(self) -> int:
        return TOY_ROWS

    def _load_row(self, row: int, rng: np.random.Generator) -> Sample:
        key = f"toy#{row}"
        if self.stage == "pretrain":
            s = self._caption(row, rng)
            return CaptionSample(s.image, s.caption, key)
        r = rng.random()
        if r < self.caption_fraction:  # text-to-image inside the instruct stage: no source image
            c = self._caption(row, rng)
            return InstructSample([], c.caption, c.image, key)
        if r < self.caption_fraction + self.subject_fraction:
            s = self.world.subject_sample("train", row, n_refs=int(rng.integers(1, 3)))
            return InstructSample(list(s.references), s.prompt, s.target_image, key)
        e = self.world.edit_sample("train", row)
        return InstructSample([e.source_image], e.instruction, e.target_image, key)


def open_training_data(cfg: RunConfig, *, rank: int, world_size: int) -> IndexedDataset:
    d, stage, seed = cfg.data, cfg.train.stage, cfg.train.seed
    if d.kind == "toyworld":
        world = ToyWorld(size=d.toyworld_size, seed=d.toyworld_seed)
        return ToyWorldData(
            world,
            stage,
            subject_fraction=d.toyworld_subject_fraction,
            caption_fraction=d.toyworld_caption_fraction,
            caption_mix=d.toyworld_caption_mix,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
    if not d.path:
        raise ValueError(f"data.path is empty: data.kind={d.kind!r} needs the path of the dataset")
    sizing = {"buckets": [tuple(b) for b in d.buckets]} if d.buckets else {"resolution": d.resolution}
    extra = {name: getattr(d, name) for name in FORMAT_OPTIONS[d.kind] if getattr(d, name) is not None}
    return open_dataset(
        d.kind,
        d.path,
        stage,
        seed=seed,
        rank=rank,
        world_size=world_size,
        random_crop=d.random_crop,
        **sizing,
        **extra,
    )


def sample_size(cfg: RunConfig) -> tuple[int, int]:
    """(height, width) of the sample grids."""
    if cfg.data.kind == "toyworld":
        return cfg.data.toyworld_size, cfg.data.toyworld_size
    if cfg.data.buckets:
        w, h = cfg.data.buckets[0]
        return h, w
    return cfg.data.resolution, cfg.data.resolution
