"""The dataset contract shared by all formats: epoch order, rank split, resume, skip accounting, batching.

Every format reduces to "this rank's records of epoch ``e``, in a fixed order". A record is decoded lazily; a broken
one raises :class:`SampleSkipped` and is counted, not yielded. Three guarantees follow from that single design:

* Determinism: the order depends only on ``(seed, epoch)``, and each record gets its own rng seeded from
  ``(seed, epoch, record ids)`` (random crop, prompt choice), so a record looks the same however it was reached.
* Resume: ``EpochIterator.position`` counts the records consumed so far, *including skipped ones*; saving
  ``(epoch, position)`` with a checkpoint and calling ``iter_from(epoch, position)`` replays exactly the remaining
  samples, without decoding the ones before (skipped records would make a count of *usable* samples ambiguous).
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

__all__ = ["EpochIterator", "IndexedDataset", "Record", "SampleDataset", "Stage", "StreamError", "iter_batches"]

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

    def iter_from(self, epoch: int, start_index: int = 0) -> EpochIterator:
        """Iterate epoch ``epoch`` from position ``start_index`` (a saved ``EpochIterator.position``)."""
        if epoch < 0 or start_index < 0:
            raise ValueError(f"epoch and start_index must be >= 0, got {epoch} and {start_index}")
        return EpochIterator(self, epoch, start_index)

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

    def __init__(self, dataset: SampleDataset, epoch: int, start: int) -> None:
        self.dataset = dataset
        self.epoch = epoch
        self.start = start
        self.position = start  # records consumed (usable or skipped): pass to iter_from to resume after them
        self.yielded = 0
        self.skips = SkipCounter()
        self._records = dataset._records(epoch, start)

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
            if isinstance(item, StreamError):
                self._skip(item.reason, item.where, item.detail)
                continue
            self.position += 1
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

    def __len__(self) -> int:
        """Records of this rank per epoch (usable or not), e.g. for steps-per-epoch."""
        return len(range(self.rank, self.num_rows, self.world_size))

    def _records(self, epoch: int, start: int) -> Iterator[Record]:
        rows = self.epoch_order(epoch)[self.rank :: self.world_size]
        for row in rows[start:].tolist():
            yield Record(self._row_key(row), (row,), lambda rng, row=row: self._load_row(row, rng))


def _bucket_of(sample: object) -> tuple[int, int]:
    if isinstance(sample, CaptionSample):
        return sample.image.size
    if isinstance(sample, InstructSample):
        return sample.target.size
    raise TypeError(f"by_bucket batching needs CaptionSample or InstructSample items, got {type(sample).__name__}")


def iter_batches(
    samples: Iterable[S], batch_size: int, *, by_bucket: bool = False, drop_last: bool = True
) -> Iterator[list[S]]:
    """Group samples into lists of exactly ``batch_size`` (skips happen upstream, so batches never shrink).

    With ``by_bucket`` a batch only holds samples of one image size (the target size for instruct samples), each
    size filling its own pending batch. At the end of the stream the incomplete batches are dropped (and logged) when
    ``drop_last``, else yielded short. Log ``iterator.skips.as_metrics()`` and checkpoint ``iterator.position``
    after each batch; with ``by_bucket``, samples waiting in other buckets at checkpoint time are not replayed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: dict[object, list[S]] = {}
    for sample in samples:
        bucket = _bucket_of(sample) if by_bucket else None
        batch = pending.setdefault(bucket, [])
        batch.append(sample)
        if len(batch) == batch_size:
            del pending[bucket]
            yield batch
    leftovers = [batch for batch in pending.values() if batch]
    if drop_last:
        dropped = sum(len(batch) for batch in leftovers)
        if dropped:
            logger.info("dropped %d samples in incomplete batches at the end of the stream (drop_last=True)", dropped)
        return
    yield from leftovers
