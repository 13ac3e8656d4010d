"""WebDataset tar shards in the img2dataset layout, read with stdlib ``tarfile`` (no ``webdataset`` dependency).

A shard holds records as consecutive members sharing a key (the member path up to the first dot of its basename):
``000010001.jpg``, ``000010001.txt``, ``000010001.json``. Pretrain records need an image (``jpg``/``jpeg``/``png``/
``webp``) and a caption (``txt``, or the ``caption_key`` field of ``json``). Instruct records, for which img2dataset
has no convention, use ``source.<ext>`` or ``source_0.<ext>``, ``source_1.<ext>``... plus ``target.<ext>`` and the
instruction in ``txt`` or the ``instruction_key`` field of ``json``.

Shards are read front to back; members of records this rank does not need are never read (the tar index is walked
header by header), which is what makes resuming cheap. Only the shard order is shuffled per epoch: a global shuffle
would need random access into the tars, which is exactly what this format trades away for streaming throughput.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from .base import Record, SampleDataset, Stage, StreamError, choose_split_by
from .samples import (
    BAD_METADATA,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    MISSING_SOURCE,
    UNREADABLE_SHARD,
    CaptionSample,
    InstructSample,
    Sample,
    SampleSkipped,
    decode_image,
)
from .splits import split_files

__all__ = ["WebDatasetReader", "expand_braces", "expand_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00009}`` (zero padding kept) and ``{a,b,c}`` groups, left to right, like the shell."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = int(numeric.group(1)), int(numeric.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} goes backwards; write it low..high")
        width = len(numeric.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_shards(path: str | Sequence[str], split: str = "train") -> list[str]:
    """Shard paths from a directory (its ``*.tar`` of ``split``: see ``splits.split_files``), a glob, a brace
    pattern, or a list of any of those (globs and patterns are taken as given)."""
    if not isinstance(path, str):
        return [shard for part in path for shard in expand_shards(part, split)]
    if os.path.isdir(path):
        shards = split_files(path, ".tar", split, deep=False)
        if not shards:
            raise FileNotFoundError(f"no *.tar shard in directory {path!r}")
        return shards
    shards: list[str] = []
    missing: list[str] = []
    for candidate in expand_braces(path):
        if any(char in candidate for char in "*?["):
            matched = sorted(glob.glob(candidate))
            if not matched:
                missing.append(candidate)
            shards.extend(matched)
        elif os.path.isfile(candidate):
            shards.append(candidate)
        else:
            missing.append(candidate)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} shard path(s) from {path!r} do not exist: {shown}")
    return shards


def _split_name(name: str) -> tuple[str, str]:
    """``'dir/000001.source_0.jpg'`` -> ``('dir/000001', 'source_0.jpg')`` (the webdataset key/extension rule)."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    if not stem:  # hidden / AppleDouble files such as '._000001.jpg' belong to no record
        return "", ""
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


def iter_tar_groups(path: str, wanted: Callable[[], bool]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(index_in_shard, key, {ext: bytes})`` for consecutive same-key members.

    ``wanted()`` is called once per record, in order; member bytes are only read for records it accepts, so
    skipping records costs header reads only. Raises tarfile/OS errors for unreadable or truncated shards.
    """
    with tarfile.open(path, mode="r:*") as tar:
        key: str | None = None
        index = -1
        group: dict[str, bytes] | None = None
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_name(member.name)
            if not member_key or not ext:
                continue
            if member_key != key:
                if key is not None and group is not None:
                    yield index, key, group
                key, index = member_key, index + 1
                group = {} if wanted() else None
            if group is not None:
                handle = tar.extractfile(member)
                if handle is not None:
                    group[ext] = handle.read()
        if key is not None and group is not None:
            yield index, key, group


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleSkipped(BAD_METADATA, f"{what} is not UTF-8: {e}") from e


def _json_field(group: dict[str, bytes], field: str) -> Any:
    if "json" not in group:
        return None
    try:
        meta = json.loads(group["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleSkipped(BAD_METADATA, f"bad json: {e}") from e
    if not isinstance(meta, dict):
        raise SampleSkipped(BAD_METADATA, f"json must be an object, got {type(meta).__name__}")
    return meta.get(field)


def _text_or_json(group: dict[str, bytes], field: str, reason: str) -> str:
    if "txt" in group:
        text = _text(group["txt"], "txt")
        if text:
            return text
    value = _json_field(group, field)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise SampleSkipped(reason, f"no non-empty 'txt' member or json field {field!r}")


def _image_member(group: dict[str, bytes], prefix: str = "") -> bytes | None:
    for ext in IMAGE_EXTS:
        if prefix + ext in group:
            return group[prefix + ext]
    return None


def _source_members(group: dict[str, bytes]) -> list[bytes]:
    single = _image_member(group, "source.")
    if single is not None:
        return [single]
    numbered: list[tuple[int, bytes]] = []
    for ext, data in group.items():
        match = re.fullmatch(r"source_(\d+)\.(\w+)", ext)
        if match and match.group(2) in IMAGE_EXTS:
            numbered.append((int(match.group(1)), data))
    return [data for _, data in sorted(numbered, key=lambda item: item[0])]


class _RankCursor:
    """This rank's walk over an epoch's records: which ones to read, and where a tar error falls among its positions.

    ``position`` counts this rank's records exactly as ``EpochIterator.position`` does, so that resuming at ``start``
    reads nothing before it. A tar error ends its shard inside the last record asked about; that record never becomes a
    Record, so it gives its position back, and the error belongs between two positions: it is reported only when it
    lies at or after ``start`` (one before ``start`` was counted by the run that saved ``start``), and by one rank:
    the one whose record it cut (rank 0 for an error before a shard's first record), so that the count summed over
    processes does not grow with their number.
    """

    def __init__(self, start: int, *, rank: int, world_size: int) -> None:
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # this rank's records so far
        self.seen = 0  # records of all ranks so far (the split_by='sample' deal)
        self.open_record_is_mine = False  # the last record asked about, in the current shard, is this rank's
        self.opened = False  # a record of the current shard has been asked about

    def start_shard(self) -> None:
        """A new shard begins: an error before its first record belongs to no record."""
        self.open_record_is_mine = False
        self.opened = False

    def wanted(self) -> bool:
        """Called once per record in order: is it this rank's, and at or after ``start`` (so worth reading)?"""
        mine = self.seen % self.world_size == self.rank
        self.seen += 1
        self.open_record_is_mine, self.opened = mine, True
        if not mine:
            return False
        self.position += 1
        return self.position > self.start

    def tar_error(self) -> bool:
        """A tar error ended the current shard; True when this rank should report it (its record, or rank 0's before
        any record, at or after ``start``)."""
        reporter = self.open_record_is_mine or (not self.opened and self.rank == 0)
        if self.open_record_is_mine:
            self.position -= 1  # the record it cut short takes no position
            self.open_record_is_mine = False
        return reporter and self.position >= self.start


class WebDatasetReader(SampleDataset):
    """Samples from img2dataset-style tar shards; see the module docstring for the member conventions."""

    def data_files(self) -> list[str]:
        return list(self.shards)

    def __init__(
        self,
        path: str | Sequence[str],
        stage: Stage,
        *,
        caption_key: str = "caption",
        instruction_key: str = "instruction",
        split_by: Literal["auto", "shard", "sample"] = "auto",
        split: str = "train",
        **common: Any,
    ) -> None:
        """``split_by`` chooses how ranks share the data: ``shard`` gives each rank whole shards (each byte read
        once, but rank sizes differ by up to a shard), ``sample`` makes every rank read every shard and keep every
        ``world_size``-th record, ``auto`` picks ``shard`` when there are at least ``world_size`` shards. ``split``
        picks a folder's shards of that split when their names carry one (``cc3m-train-0000.tar``)."""
        self.shards = expand_shards(path, split)
        super().__init__(path if isinstance(path, str) else ",".join(path), stage, **common)
        self.split_by = choose_split_by(split_by, len(self.shards), self.world_size, "shards")
        self.caption_key = caption_key
        self.instruction_key = instruction_key

    def epoch_shards(self, epoch: int) -> list[tuple[int, str]]:
        """``(shard_id, path)`` pairs in the order epoch ``epoch`` reads them, before the rank split."""
        order = self.epoch_rng(epoch).permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        return [(int(i), self.shards[i]) for i in order]

    def _records(self, epoch: int, start: int) -> Iterator[Record | StreamError]:
        shards = self.epoch_shards(epoch)
        if self.split_by == "shard":
            shards = shards[self.rank :: self.world_size]
            cursor = _RankCursor(start, rank=0, world_size=1)  # every record of this rank's shards is its own
        else:
            cursor = _RankCursor(start, rank=self.rank, world_size=self.world_size)
        for shard_id, shard in shards:
            cursor.start_shard()
            groups = iter_tar_groups(shard, cursor.wanted)
            while True:
                try:
                    index, key, group = next(groups)
                except StopIteration:
                    break
                except _TAR_ERRORS as e:
                    if cursor.tar_error():
                        yield StreamError(UNREADABLE_SHARD, shard, f"{type(e).__name__}: {e} (rest of shard skipped)")
                    break
                yield Record(key, (shard_id, index), lambda rng, key=key, group=group: self._decode(key, group, rng))

    def _decode(self, key: str, group: dict[str, bytes], rng: np.random.Generator) -> Sample:
        if self.stage == "pretrain":
            image = _image_member(group)
            if image is None:
                raise SampleSkipped(MISSING_IMAGE, f"no member with extension {list(IMAGE_EXTS)}; has {sorted(group)}")
            caption = _text_or_json(group, self.caption_key, MISSING_CAPTION)
            return CaptionSample(image=decode_image(image, key), caption=caption, key=key)
        target = _image_member(group, "target.")
        if target is None:
            raise SampleSkipped(MISSING_IMAGE, f"no 'target.<{'|'.join(IMAGE_EXTS)}>' member; has {sorted(group)}")
        sources = _source_members(group)
        if not sources:
            raise SampleSkipped(MISSING_SOURCE, f"no 'source.<ext>' or 'source_<n>.<ext>' member; has {sorted(group)}")
        instruction = _text_or_json(group, self.instruction_key, MISSING_INSTRUCTION)
        return InstructSample(
            source_images=[decode_image(data, key) for data in sources],
            instruction=instruction,
            target=decode_image(target, key),
            key=key,
        )
