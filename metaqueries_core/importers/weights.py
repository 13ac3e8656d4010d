"""Read named tensors from a Hugging Face weights folder without loading all of it: `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (sharded or not, read with
`weights_only=True` and memory-mapped)."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@contextmanager
def open_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {e}") from e


def load_weights_only(path: Path) -> Any:
    """A torch file read with weights_only (no pickled code runs): memory-mapped when it is the zip format
    torch.save writes, read whole when it is the legacy format, which cannot be mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False, which would run the file's code
        detail = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(e).strip(), re.S)
        raise ValueError(
            f"{str(path)!r} is not a readable weights-only torch file: it is damaged, not a torch file, or holds "
            "Python objects besides tensors, which this pack never unpickles (they could run code)"
            + (f" ({detail.group(1).strip()})" if detail else "")
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable weights-only torch file: {e}") from e


def tensor_dict(value: Any, path: Path) -> dict[str, torch.Tensor]:
    """`value` checked to be a state dict (names -> tensors), as read from `path`."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (names -> tensors) but a {type(value).__name__}")
    return value


class WeightsFolder:
    """Key -> tensor access over the weight files of one folder; each file opens on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._bins: dict[str, dict[str, torch.Tensor]] = {}  # memory-mapped .bin files, loaded on first use
        self.file_of = self._file_map()  # key -> file name

    def _file_map(self) -> dict[str, str]:
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.folder / index).is_file():
                try:
                    weight_map = json.loads((self.folder / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{str(self.folder / index)!r} has no readable 'weight_map': {e}") from e
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError(f"{str(self.folder / index)!r}: 'weight_map' must map tensor names to file names")
                return weight_map
        if (self.folder / SAFETENSORS).is_file():
            with open_safetensors(self.folder / SAFETENSORS) as f:
                return dict.fromkeys(f.keys(), SAFETENSORS)
        if (self.folder / BIN).is_file():
            return dict.fromkeys(self._bin(BIN).keys(), BIN)
        raise FileNotFoundError(
            f"{str(self.folder)!r} holds no model weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
            f"{BIN_INDEX}"
        )

    def _bin(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._bins:
            self._bins[name] = tensor_dict(load_weights_only(self.folder / name), self.folder / name)
        return self._bins[name]

    def _bin_tensor(self, name: str, key: str) -> torch.Tensor:
        tensors = self._bin(name)
        if key not in tensors:
            raise ValueError(f"{str(self.folder / name)!r} lacks {key!r}, which the folder's index places there")
        return tensors[key]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, opening each file once."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file(key), []).append(key)
        out = {}
        for name, names in by_file.items():
            if name.endswith(".safetensors"):
                with open_safetensors(self.folder / name) as f:
                    out.update({k: f.get_tensor(k) for k in names})
            else:
                out.update({k: self._bin_tensor(name, k) for k in names})
        return out

    def _file(self, key: str) -> str:
        if key not in self.file_of:
            raise KeyError(f"{str(self.folder)!r} has no tensor {key!r}")
        name = self.file_of[key]
        if not (self.folder / name).is_file():
            raise FileNotFoundError(f"{str(self.folder / name)!r} (listed in the folder's index) does not exist")
        return name

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a 2D tensor, read without loading the rest (an embedding table's added rows)."""
        name = self._file(key)
        if name.endswith(".safetensors"):
            with open_safetensors(self.folder / name) as f:
                return f.get_slice(key)[start:stop]
        return self._bin_tensor(name, key)[start:stop].clone()

    def shape(self, key: str) -> tuple[int, ...]:
        name = self._file(key)
        if name.endswith(".safetensors"):
            with open_safetensors(self.folder / name) as f:
                return tuple(f.get_slice(key).get_shape())
        return tuple(self._bin_tensor(name, key).shape)

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, keyed without it."""
        found = self.get_many([k for k in self.keys() if k.startswith(prefix)])
        return {k.removeprefix(prefix): v for k, v in found.items()}
