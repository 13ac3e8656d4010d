"""Local Hugging Face datasets: parquet folders and ``datasets.save_to_disk`` arrow folders, read with pyarrow.

pyarrow is imported lazily (only this format needs it) and reads both storage forms without the ``datasets``
library. Three column layouts are understood, detected from the column names or forced with ``layout=``:

* ``caption`` (pretrain): ``image`` (or ``jpg``, ``jpeg``, ``png``, ``webp``: img2dataset's parquet output, webdataset
  shards saved by ``datasets``) + ``caption``, ``text`` or ``txt``;
* ``metaquery_instruct`` (instruct, MetaQuery-Instruct-2.4M): ``source_images`` (list of images), ``prompt``,
  ``target_image``;
* ``omniedit`` (instruct, OmniEdit): ``src_img``, ``edited_img``, ``edited_prompt_list`` (several phrasings of one
  edit; one is drawn with the sample's rng, or the first / last with ``prompt_choice='first'`` / ``'last'``: the
  reference trainer takes the last).

Images may be stored as the HF ``Image`` feature (a struct ``{bytes, path}``), raw bytes, or a path string; paths are
resolved relative to the dataset folder. Arrow files are memory-mapped, so their order is a full permutation;
parquet must decode a whole row group to reach one row, so its order shuffles row groups and then rows inside each
(a block shuffle): random rows would decode a row group per sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .base import IndexedDataset, Stage, choose_split_by
from .samples import (
    BAD_METADATA,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    MISSING_SOURCE,
    UNREADABLE_FILE,
    CaptionSample,
    InstructSample,
    NoUsableSampleError,
    Sample,
    SampleSkipped,
    decode_image,
    load_image_file,
)
from .splits import split_files

__all__ = ["LAYOUTS", "HFDiskReader", "Layout", "check_same_columns", "detect_layout"]

LayoutName = Literal["auto", "caption", "metaquery_instruct", "omniedit"]
PROMPT_CHOICES = ("random", "first", "last")


@dataclass(frozen=True)
class Layout:
    """A column layout: the stage it feeds and, per role, the column names accepted for it (first present wins)."""

    name: str
    stage: Stage
    roles: dict[str, tuple[str, ...]]

    def resolve(self, columns: Sequence[str]) -> dict[str, str] | None:
        """Role -> column for ``columns``, or None when a role has no column."""
        chosen: dict[str, str] = {}
        for role, names in self.roles.items():
            found = next((n for n in names if n in columns), None)
            if found is None:
                return None
            chosen[role] = found
        return chosen

    def needs(self) -> str:
        """Human-readable column requirement, e.g. ``image + caption/text``, for error messages."""
        return " + ".join("/".join(names) for names in self.roles.values())


LAYOUTS: dict[str, Layout] = {
    # img2dataset's parquet output stores `jpg` bytes next to `caption`; webdataset shards loaded by `datasets`
    # (e.g. pixparse/cc12m-wds) have `jpg` / `png` ... and `txt` columns
    "caption": Layout(
        "caption",
        "pretrain",
        {"image": ("image", "jpg", "jpeg", "png", "webp"), "text": ("caption", "text", "txt")},
    ),
    "metaquery_instruct": Layout(
        "metaquery_instruct",
        "instruct",
        {"sources": ("source_images",), "text": ("prompt",), "target": ("target_image",)},
    ),
    "omniedit": Layout(
        "omniedit", "instruct", {"sources": ("src_img",), "text": ("edited_prompt_list",), "target": ("edited_img",)}
    ),
}


def detect_layout(columns: Sequence[str], stage: Stage, layout: str = "auto") -> tuple[Layout, dict[str, str]]:
    """Pick the layout for a column list (or check a forced one); the error lists what was found and what is needed."""
    needs = "; ".join(f"{lay.name} ({lay.stage}) needs {lay.needs()}" for lay in LAYOUTS.values())
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; allowed: {['auto', *LAYOUTS]}")
        chosen = LAYOUTS[layout]
        if chosen.stage != stage:
            raise ValueError(f"layout {layout!r} gives {chosen.stage} samples, but stage is {stage!r}")
        mapping = chosen.resolve(columns)
        if mapping is None:
            raise ValueError(f"layout {layout!r} needs columns {chosen.needs()}; found {sorted(columns)}")
        return chosen, mapping
    for candidate in LAYOUTS.values():
        mapping = candidate.resolve(columns) if candidate.stage == stage else None
        if mapping is not None:
            return candidate, mapping
    raise ValueError(f"no {stage} layout matches the columns {sorted(columns)}; {needs}")


def check_same_columns(
    file_columns: Sequence[tuple[str, Sequence[str]]], layout: Layout, mapping: dict[str, str]
) -> None:
    """Every file must have the columns the layout took from the first one.

    Checked when the dataset opens because pyarrow's ``read_row_group`` silently leaves out a missing column, which
    would only surface as a KeyError when training reaches that file.
    """
    wanted = list(mapping.values())
    first = file_columns[0][0]
    for file, columns in file_columns[1:]:
        missing = [column for column in wanted if column not in columns]
        if missing:
            raise ValueError(
                f"{file!r} has columns {sorted(columns)}, without {missing}; layout {layout.name!r} (detected from "
                f"{first!r}) reads the columns {wanted} from every file of the dataset: give all its files the same "
                "column names"
            )


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(
            "reading Hugging Face parquet/arrow datasets needs pyarrow, which is not installed: pip install pyarrow"
        ) from e
    return pyarrow


def _arrow_files(folder: str, split: str, *, deep: bool) -> list[str]:
    """Arrow files of a save_to_disk folder, in the order its ``state.json`` lists them; else the split's
    ``*.arrow`` files (top level, or with ``deep`` anywhere below, as ``load_dataset`` caches keep them)."""
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            files = [os.path.join(folder, d["filename"]) for d in json.load(f).get("_data_files", [])]
        if files:
            return files
    return split_files(folder, ".arrow", split, deep=deep)


class HFDiskReader(IndexedDataset):
    """Samples from a local parquet folder / file or a ``save_to_disk`` folder (``split`` picks a DatasetDict split)."""

    def __init__(
        self,
        path: str,
        stage: Stage,
        *,
        layout: LayoutName = "auto",
        split: str = "train",
        prompt_choice: Literal["random", "first", "last"] = "random",
        split_by: Literal["auto", "shard", "sample"] = "auto",
        **common: Any,
    ) -> None:
        """``split_by`` chooses how ranks share a parquet dataset: ``shard`` gives each rank whole row groups (each
        read by one rank; rank sizes differ by up to a row group), ``sample`` makes every rank decode every row group
        and keep every ``world_size``-th row; ``auto`` picks ``shard`` when there are at least ``world_size`` row
        groups. Arrow files are memory-mapped, read row by row: they always split by sample."""
        super().__init__(path, stage, **common)
        if prompt_choice not in PROMPT_CHOICES:
            raise ValueError(f"unknown prompt_choice {prompt_choice!r}; allowed: {list(PROMPT_CHOICES)}")
        self.prompt_choice = prompt_choice
        self._pa = _pyarrow()
        self.base_dir = path if os.path.isdir(path) else os.path.dirname(path)
        self.files: list[str] = []  # the parquet or arrow files read, in order
        self._arrow_table: Any = None
        self._arrow_parts: list[Any] = []  # the arrow files' tables until the layout picks their columns
        self._parquet: list[Any] = []
        self._blocks: list[tuple[int, int]] = []  # (parquet file index, row group) per block
        self._block_starts = np.zeros(1, dtype=np.int64)
        self._cache: tuple[int, list[dict[str, Any]]] | None = None
        file_columns = self._open(path, split)
        self.layout, self.columns = detect_layout(file_columns[0][1], stage, layout)
        check_same_columns(file_columns, self.layout, self.columns)
        if self._arrow_parts:
            wanted = list(self.columns.values())
            self._arrow_table = self._pa.concat_tables([part.select(wanted) for part in self._arrow_parts])  # zero copy
            self._arrow_parts = []
        if self.num_rows == 0:
            raise NoUsableSampleError(f"no usable sample in {path}: the dataset has 0 rows")
        # arrow tables are memory-mapped and read row by row: no pieces to hand out
        pieces = 0 if self._arrow_table is not None else len(self._blocks)
        self.split_by = choose_split_by(split_by, pieces, self.world_size, "parquet row groups")

    def data_files(self) -> list[str]:
        """The parquet / arrow files (images a table names by path are not listed: that would read a column)."""
        return list(self.files)

    def _open(self, path: str, split: str) -> list[tuple[str, list[str]]]:
        """Find the files and read their metadata; returns ``(file, its column names)`` per file, in order."""
        pa = self._pa
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f).get("splits", [])
            if split not in splits:
                raise ValueError(f"split {split!r} not in the DatasetDict at {path!r}; it has {splits}")
            path = os.path.join(path, split)
            self.base_dir = path
        # a folder: its top-level arrow files (save_to_disk), else parquet files (also below, e.g. data/), else arrow
        # files below (a load_dataset cache); each kind keeping the split's files
        arrow = [path] if path.endswith(".arrow") else []
        parquet = [path] if path.endswith(".parquet") else []
        if os.path.isdir(path):
            arrow = _arrow_files(path, split, deep=False)
            parquet = [] if arrow else split_files(path, ".parquet", split)
            arrow = arrow or ([] if parquet else _arrow_files(path, split, deep=True))
        if arrow:
            self.files = arrow
            self._arrow_parts = [self._read_arrow(f) for f in arrow]
            return [(f, list(part.column_names)) for f, part in zip(arrow, self._arrow_parts)]
        if not parquet:
            raise FileNotFoundError(
                f"no dataset at {path!r}: expected a .parquet or .arrow file, a folder of *.parquet (or data/*.parquet), "
                "a save_to_disk folder (dataset_info.json + data-*.arrow) or a folder of *.arrow files"
            )
        files = self.files = parquet
        self._parquet = [pa.parquet.ParquetFile(f) for f in files]
        sizes: list[int] = []
        for i, pf in enumerate(self._parquet):
            for rg in range(pf.metadata.num_row_groups):
                self._blocks.append((i, rg))
                sizes.append(pf.metadata.row_group(rg).num_rows)
        self._block_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        return [(f, list(pf.schema_arrow.names)) for f, pf in zip(files, self._parquet)]  # footers only

    def _read_arrow(self, file: str) -> Any:
        pa = self._pa
        source = pa.memory_map(file)  # zero copy: rows are paged in from disk only when read
        try:
            return pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()

    @property
    def num_rows(self) -> int:
        if self._arrow_table is not None:
            return int(self._arrow_table.num_rows)
        return int(self._block_starts[-1])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Full permutation for arrow; for parquet, row groups in random order and rows shuffled inside each."""
        if self._arrow_table is not None:
            return super().epoch_order(epoch)
        return np.concatenate(self._epoch_blocks(epoch))

    def rank_rows(self, epoch: int) -> np.ndarray:
        if self.split_by == "sample":
            return super().rank_rows(epoch)
        mine = self._epoch_blocks(epoch)[self.rank :: self.world_size]  # whole row groups
        return np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)

    def _epoch_blocks(self, epoch: int) -> list[np.ndarray]:
        """The rows of each parquet row group, in epoch ``epoch``'s order of groups and of rows inside each."""
        starts = self._block_starts
        if not self.shuffle:
            return [np.arange(starts[b], starts[b + 1]) for b in range(len(self._blocks))]
        rng = self.epoch_rng(epoch)
        order = rng.permutation(len(self._blocks))
        return [starts[b] + rng.permutation(int(starts[b + 1] - starts[b])) for b in order]

    def _row(self, row: int) -> dict[str, Any]:
        wanted = list(self.columns.values())
        if self._arrow_table is not None:
            return self._arrow_table.slice(row, 1).to_pylist()[0]
        block = int(np.searchsorted(self._block_starts, row, side="right")) - 1
        if self._cache is None or self._cache[0] != block:
            file_index, row_group = self._blocks[block]
            try:
                table = self._parquet[file_index].read_row_group(row_group, columns=wanted)
            except (OSError, self._pa.ArrowException) as e:  # a damaged row group costs its rows, not the run
                where = f"row group {row_group} of {self.files[file_index]}"
                raise SampleSkipped(UNREADABLE_FILE, f"{where}: {e}") from e
            self._cache = (block, table.to_pylist())
        return self._cache[1][row - int(self._block_starts[block])]

    def _image(self, value: Any, key: str) -> Any:
        if isinstance(value, dict):  # the HF Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return decode_image(value["bytes"], key)
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return decode_image(bytes(value), key)
        if isinstance(value, str) and value:
            return load_image_file(value if os.path.isabs(value) else os.path.join(self.base_dir, value), key)
        if value is None or value in (b"", ""):
            raise SampleSkipped(MISSING_IMAGE, "image cell is empty")
        raise SampleSkipped(BAD_METADATA, f"cannot read an image from a {type(value).__name__} cell")

    def _text(self, value: Any, rng: np.random.Generator, reason: str) -> str:
        if isinstance(value, list):  # several phrasings (OmniEdit's edited_prompt_list)
            options = [v.strip() for v in value if isinstance(v, str) and v.strip()]
            if not options:
                raise SampleSkipped(reason, "the text list has no non-empty string")
            if self.prompt_choice == "random":
                return options[int(rng.integers(len(options)))]
            return options[0] if self.prompt_choice == "first" else options[-1]
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise SampleSkipped(reason, f"text cell is {value!r}")

    def _load_row(self, row: int, rng: np.random.Generator) -> Sample:
        key = self._row_key(row)
        cells = self._row(row)
        cols = self.columns
        if self.layout.stage == "pretrain":
            caption = self._text(cells[cols["text"]], rng, MISSING_CAPTION)
            return CaptionSample(image=self._image(cells[cols["image"]], key), caption=caption, key=key)
        instruction = self._text(cells[cols["text"]], rng, MISSING_INSTRUCTION)
        sources = cells[cols["sources"]]
        if not isinstance(sources, list):
            sources = [] if sources is None else [sources]  # OmniEdit stores one source image, not a list
        if not sources:
            raise SampleSkipped(MISSING_SOURCE, f"column {cols['sources']!r} is empty")
        return InstructSample(
            source_images=[self._image(value, key) for value in sources],
            instruction=instruction,
            target=self._image(cells[cols["target"]], key),
            key=key,
        )
