"""The dataset contract shared by all formats: epoch order, rank split, resume, skip accounting, batching.

Every format reduces to "this rank's records of epoch ``e``, in a fixed order". A record is decoded lazily; a broken
one raises :class:`SampleSkipped` and is counted, not yielded. Three guarantees follow from that single design:

* Determinism: the order depends only on ``(seed, epoch)``, and each record gets its own rng seeded from
  ``(seed, epoch, record ids)`` (random crop, prompt choice), so a record looks the same however it was reached.
* Resume: ``EpochIterator.position`` counts the records consumed so far, *including skipped ones*; saving
  ``(epoch, position)`` with a checkpoint and calling ``iter_from(epoch, position)`` replays exactly the remaining
  samples, without decoding the ones before (skipped records would make a count of *usable* samples ambiguous).
  Bucketed batching also saves ``Batches.waiting`` (the positions of samples held in other sizes' unfinished
  batches); ``iter_from(epoch, position, waiting)`` yields those again first, so the batches continue exactly.
* Rank split: all ranks compute the same order and rank ``r`` keeps every ``world_size``-th record (or shard), so
  the ranks partition the data.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import numpy as np

from .samples import CaptionSample, InstructSample, NoUsableSampleError, Sample, SampleSkipped, SkipCounter
from .transforms import nearest_bucket, resize_and_crop, target_size, validate_buckets

__all__ = ["Batches", "EpochIterator", "IndexedDataset", "Record", "SampleDataset", "Stage", "StreamError"]

logger = logging.getLogger(__name__)

Stage = Literal["pretrain", "instruct"]
S = TypeVar("S")


@dataclass(frozen=True)
class Record:
    """One record of a rank's epoch order, not decoded yet; ``load`` turns it into a sample or raises SampleSkipped."""

    key: str
    rng_ids: tuple[int, ...]
    load: Callable[[np.random.Generator], Sample]


@dataclass(frozen=True)
class StreamError:
    """A failure outside any single record (e.g. a truncated shard): counted as a skip, not as a position."""

    reason: str
    where: str
    detail: str


def choose_split_by(split_by: str, pieces: int, world_size: int, what: str) -> str:
    """How processes share a dataset: ``shard`` (each reads whole pieces of it: tar shards, parquet row groups, so
    each byte is read once) or ``sample`` (each reads everything and keeps every ``world_size``-th record); ``auto``
    picks ``shard`` when every process gets a piece."""
    if split_by not in ("auto", "shard", "sample"):
        raise ValueError(f"unknown split_by {split_by!r}; allowed: ['auto', 'shard', 'sample']")
    if split_by == "auto":
        return "shard" if pieces >= world_size else "sample"
    if split_by == "shard" and pieces < world_size:
        raise ValueError(
            f"split_by='shard' needs at least world_size={world_size} {what}, found {pieces}; use split_by='sample' "
            "or 'auto'"
        )
    return split_by


def check_stage(stage: str) -> Stage:
    """Validate a stage name (the readers dispatch on it)."""
    allowed = get_args(Stage)
    if stage not in allowed:
        raise ValueError(f"unknown stage {stage!r}; allowed: {list(allowed)}")
    return stage  # type: ignore[return-value]


class SampleDataset(ABC):
    """Base of all readers: subclasses only implement :meth:`_records`; this class does the rest."""

    def __init__(
        self,
        path: str,
        stage: Stage,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        resolution: int | tuple[int, int] | None = None,
        buckets: Sequence[tuple[int, int]] | None = None,
        random_crop: bool = False,
    ) -> None:
        """Common options; ``resolution`` or ``buckets`` (not both) resize the pretrain image / instruct target.

        Instruct *source* images are left at their size on purpose: they go to the MLLM, whose processor does its
        own resizing, and cropping them could remove the very object the instruction talks about.
        """
        self.path = path
        self.stage = check_stage(stage)
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are unsigned), got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if resolution is not None and buckets is not None:
            raise ValueError("give either resolution (one fixed size) or buckets (aspect-ratio buckets), not both")
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.resolution = target_size(resolution) if resolution is not None else None
        self.buckets = validate_buckets(buckets) if buckets is not None else None
        self.random_crop = random_crop
        self.epoch = 0
        self.skips = SkipCounter()  # over the whole run; each EpochIterator also has its own

    @abstractmethod
    def _records(self, epoch: int, start: int) -> Iterator[Record | StreamError]:
        """This rank's records of ``epoch`` in order, starting at position ``start`` (earlier ones not decoded)."""

    def data_files(self) -> list[str] | None:
        """The files whose contents decide this dataset's samples (a latent cache made while they differed is
        stale); None when a reader cannot tell."""
        return None

    def iter_from(self, epoch: int, start_index: int = 0, waiting: Sequence[int] = ()) -> EpochIterator:
        """Iterate epoch ``epoch`` from position ``start_index`` (a saved ``EpochIterator.position``), first yielding
        again the samples at the positions ``waiting`` (a saved ``Batches.waiting``: records before ``start_index``
        that were read but not batched yet)."""
        if epoch < 0 or start_index < 0:
            raise ValueError(f"epoch and start_index must be >= 0, got {epoch} and {start_index}")
        if any(not 0 <= p < start_index for p in waiting) or len(set(waiting)) != len(waiting):
            raise ValueError(f"waiting positions must be distinct and in [0, {start_index}), got {list(waiting)}")
        return EpochIterator(self, epoch, start_index, waiting)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that plain ``iter(dataset)`` runs (like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_from(self.epoch, 0)

    def epoch_rng(self, epoch: int) -> np.random.Generator:
        """The rng that orders epoch ``epoch``; identical on every rank so that the rank slices partition it."""
        return np.random.default_rng([self.seed, epoch])

    def transform(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """Resize the pretrain image / instruct target to ``resolution`` or its nearest bucket (if configured)."""
        image = sample.image if isinstance(sample, CaptionSample) else sample.target
        if self.buckets is not None:
            size = nearest_bucket(image.size, self.buckets)
        elif self.resolution is not None:
            size = self.resolution
        else:
            return sample
        image = resize_and_crop(image, size, self.random_crop, rng)
        if isinstance(sample, CaptionSample):
            return CaptionSample(image=image, caption=sample.caption, key=sample.key)
        return InstructSample(sample.source_images, sample.instruction, image, sample.key)

    def _where(self) -> str:
        rank = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        return f"{self.path}{rank}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, stage={self.stage!r}, rank={self.rank}/{self.world_size})"


class EpochIterator(Iterator[Sample]):
    """Iterator over one epoch of one rank; ``position`` and ``skips`` are what to checkpoint and to log."""

    def __init__(self, dataset: SampleDataset, epoch: int, start: int, waiting: Sequence[int] = ()) -> None:
        self.dataset = dataset
        self.epoch = epoch
        self.start = start
        # records before `start` were consumed (and their skips counted) by the run that saved it: of those only the
        # `waiting` ones are read again, from the first of them on
        self._replay_end, self._replay = start, frozenset(waiting)
        self.position = min(waiting, default=start)  # records consumed (usable or skipped): what iter_from resumes
        self.yielded = 0
        self.skips = SkipCounter()
        self._records = dataset._records(epoch, self.position)

    def _skip(self, reason: str, key: str, detail: str) -> None:
        self.skips.add(reason, key, detail)
        self.dataset.skips.counts[reason] += 1

    def __next__(self) -> Sample:
        while True:
            try:
                item = next(self._records)
            except StopIteration:
                if self.start == 0 and self.yielded == 0:
                    raise NoUsableSampleError(f"no usable sample in {self.dataset._where()}: {self.skips}") from None
                raise
            replaying = self.position < self._replay_end
            if isinstance(item, StreamError):
                if not replaying:  # one met while replaying was counted by the run that saved the position
                    self._skip(item.reason, item.where, item.detail)
                continue
            self.position += 1
            if replaying and self.position - 1 not in self._replay:  # batched before the checkpoint: not decoded
                continue
            rng = np.random.default_rng([self.dataset.seed, self.epoch, *item.rng_ids])
            try:
                sample = self.dataset.transform(item.load(rng), rng)
            except SampleSkipped as e:
                self._skip(e.reason, item.key, e.detail)
                continue
            self.yielded += 1
            return sample


class IndexedDataset(SampleDataset):
    """A dataset with random access to ``num_rows`` rows (parquet, arrow, JSONL): the order is a permutation."""

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """Rows in the whole dataset (all ranks)."""

    @abstractmethod
    def _load_row(self, row: int, rng: np.random.Generator) -> Sample:
        """Decode row ``row`` (raising SampleSkipped when unusable)."""

    def _row_key(self, row: int) -> str:
        return f"{self.path}#{row}"

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All rows of the dataset in epoch ``epoch``'s order (before the rank split); override for block shuffles."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return self.epoch_rng(epoch).permutation(self.num_rows)

    def rank_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows of epoch ``epoch``, in order: every ``world_size``-th of the epoch order."""
        return self.epoch_order(epoch)[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Records of this rank in the current epoch (usable or not), e.g. for steps-per-epoch."""
        return len(self.rank_rows(self.epoch))

    def _records(self, epoch: int, start: int) -> Iterator[Record]:
        for row in self.rank_rows(epoch)[start:].tolist():
            yield Record(self._row_key(row), (row,), lambda rng, row=row: self._load_row(row, rng))


def _bucket_of(sample: object) -> tuple[int, int]:
    if isinstance(sample, CaptionSample):
        return sample.image.size
    if isinstance(sample, InstructSample):
        return sample.target.size
    raise TypeError(f"by_bucket batching needs CaptionSample or InstructSample items, got {type(sample).__name__}")


class Batches(Iterator[list[S]]):
    """Samples grouped into lists of exactly ``batch_size`` (skips happen upstream, so batches never shrink).

    With ``by_bucket`` a batch only holds samples of one image size (the target size for instruct samples), each
    size filling its own pending batch. At the end of the stream the incomplete batches are dropped (and logged) when
    ``drop_last``, else yielded short. After each batch, checkpoint the EpochIterator's ``position`` and ``waiting``
    (the positions of the samples held in other sizes' pending batches) and log ``iterator.skips.as_metrics()``.
    """

    def __init__(self, samples: Iterable[S], batch_size: int, *, by_bucket: bool = False, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._source = samples if isinstance(samples, EpochIterator) else None
        self._samples = iter(samples)
        self._batch_size, self._by_bucket, self._drop_last = batch_size, by_bucket, drop_last
        self._pending: dict[object, list[tuple[S, int]]] = {}  # bucket -> (sample, its position) in read order
        self._ended = False

    @property
    def waiting(self) -> list[int]:
        """Positions of the samples read but not batched yet (always empty without ``by_bucket``)."""
        if self._source is None:
            raise TypeError("waiting positions need an EpochIterator (dataset.iter_from(...)) as the samples")
        return sorted(p for batch in self._pending.values() for _, p in batch)

    def __next__(self) -> list[S]:
        if not self._ended:
            for sample in self._samples:
                position = self._source.position - 1 if self._source is not None else -1
                bucket = _bucket_of(sample) if self._by_bucket else None
                batch = self._pending.setdefault(bucket, [])
                batch.append((sample, position))
                if len(batch) == self._batch_size:
                    del self._pending[bucket]
                    return [s for s, _ in batch]
            self._end_of_stream()
        if not self._pending:
            raise StopIteration
        return [s for s, _ in self._pending.pop(next(iter(self._pending)))]  # drop_last=False: the short ones

    def _end_of_stream(self) -> None:
        self._ended = True
        if self._drop_last:
            if dropped := sum(len(batch) for batch in self._pending.values()):
                logger.info("dropped %d samples in incomplete batches at the end of the stream (drop_last)", dropped)
            self._pending.clear()
