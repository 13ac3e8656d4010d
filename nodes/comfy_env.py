"""The only module of the pack that touches ComfyUI: model folders, devices, memory, progress and interrupt.

Inside ComfyUI it goes through `folder_paths`, `comfy.model_management`, `comfy.utils.ProgressBar` and the preview
settings in `comfy.cli_args`. Outside ComfyUI (tests, scripts) every service falls back to plain behaviour: model
folders live under `$METAQUERIES_MODELS_DIR` (default `./models`), the device is CUDA when available, the progress bar
does nothing, previews are off and the interrupt flag is local.
Importing this module inside ComfyUI registers the pack's model folder keys; that is its only side effect.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

try:  # ComfyUI puts these top-level modules on sys.path; outside it they do not exist
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:
    folder_paths = model_management = comfy_utils = None
try:  # preview settings: a ComfyUI without them still runs the pack, only without previews
    from comfy.cli_args import LatentPreviewMethod
    from comfy.cli_args import args as comfy_args
except ImportError:
    comfy_args = LatentPreviewMethod = None

IN_COMFYUI = folder_paths is not None

# Folder key -> (subfolder of the models dir, file extensions for a key we create). `text_encoders` and `diffusers`
# are ComfyUI core keys; `LLM` is the community convention for Hugging Face LLM folders.
MODEL_FOLDERS: dict[str, tuple[str, set[str]]] = {
    "LLM": ("LLM", set()),
    "text_encoders": ("text_encoders", set()),
    "metaqueries": ("metaqueries", {".safetensors"}),
    "diffusers": ("diffusers", {"folder"}),
}
MLLM_KEYS = ("LLM", "text_encoders")
CHECKPOINT_KEYS = ("metaqueries",)
DECODER_KEYS = ("diffusers",)
MAX_FOLDER_DEPTH = 3  # how deep to look for model folders below a root ("org/name" layouts are 2 deep)


def register_model_folders() -> None:
    """Add the default `models/<sub>` path to each key; a key set by extra_model_paths.yaml keeps its paths first."""
    for key, (sub, extensions) in MODEL_FOLDERS.items():
        existed = key in folder_paths.folder_names_and_paths
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, sub))
        if not existed:  # add_model_folder_path creates new keys with "any extension"
            paths, _ = folder_paths.folder_names_and_paths[key]
            folder_paths.folder_names_and_paths[key] = (paths, set(extensions))


if IN_COMFYUI:
    register_model_folders()


# ---- model folders -------------------------------------------------------------------------------------------
def fallback_models_dir() -> Path:
    return Path(os.environ.get("METAQUERIES_MODELS_DIR", "models"))


def folder_roots(key: str) -> list[Path]:
    """Every directory registered for a model folder key, in lookup order."""
    if IN_COMFYUI:
        if key not in folder_paths.folder_names_and_paths:
            return []
        return [Path(p) for p in folder_paths.get_folder_paths(key)]
    return [fallback_models_dir() / MODEL_FOLDERS[key][0]]


def roots_of(keys: tuple[str, ...]) -> list[Path]:
    return [root for key in keys for root in folder_roots(key)]


def _walk_dirs(root: Path, depth: int) -> Iterator[Path]:
    if depth == 0 or not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield child
            yield from _walk_dirs(child, depth - 1)


def list_folders(keys: tuple[str, ...], is_model: Callable[[Path], bool]) -> list[str]:
    """Names (relative, '/'-separated) of model folders under the roots of `keys`; a model folder is not searched."""
    names: list[str] = []
    for root in roots_of(keys):
        found: list[Path] = []
        for folder in _walk_dirs(root, MAX_FOLDER_DEPTH):
            if any(parent in found for parent in folder.parents):
                continue
            if is_model(folder):
                found.append(folder)
                name = folder.relative_to(root).as_posix()
                if name not in names:
                    names.append(name)
    return sorted(names)


def _walk_files(root: Path) -> Iterator[Path]:
    """Files below `root`, in linked folders too (as ComfyUI's own lists), never in the same folder twice."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one store
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(folder) / f for f in files)


def list_files(keys: tuple[str, ...], suffix: str) -> list[str]:
    names = {
        path.relative_to(root).as_posix()
        for root in roots_of(keys)
        for path in _walk_files(root)
        if path.name.endswith(suffix) and path.is_file()
    }
    return sorted(names)


def resolve(keys: tuple[str, ...], name: str, what: str) -> Path:
    """The first `root/name` that exists; raises naming the entry and every place it looked."""
    roots = roots_of(keys)
    for root in roots:
        path = root / name
        if path.exists():
            return path
    looked = ", ".join(str(r) for r in roots) or f"nowhere: no folder is registered for {list(keys)}"
    raise FileNotFoundError(f"{what} {name!r} not found; looked in: {looked}")


def fingerprint(keys: tuple[str, ...], name: str) -> str:
    """What a loader's IS_CHANGED returns: size and modification time of every file of the model `name` (so a model
    re-exported under the same name is loaded again), or the lookup error (the load then reports it)."""
    try:
        path = resolve(keys, name, "model")
    except FileNotFoundError as e:
        return str(e)
    files = sorted(_walk_files(path)) if path.is_dir() else [path]
    stats = [(f.relative_to(path).as_posix() if path.is_dir() else f.name, f.stat()) for f in files if f.is_file()]
    return ";".join(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in stats)


# ---- devices and memory ----------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_device(choice: str) -> torch.device:
    if choice not in DEVICES:
        raise ValueError(f"device {choice!r} not in {list(DEVICES)}")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was chosen but this torch build sees no CUDA device; choose 'auto' or 'cpu'"
            )
        return torch.device("cuda")
    if IN_COMFYUI:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(choice: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that support it, else fp16, unless a dtype is chosen."""
    if choice not in DTYPES:
        raise ValueError(f"dtype {choice!r} not in {list(DTYPES)}")
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def intermediate_device() -> torch.device:
    """Where tensors passed between nodes live (CONDITIONING, IMAGE, LATENT)."""
    if IN_COMFYUI:
        return model_management.intermediate_device()
    return torch.device("cpu")


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- progress and interrupt ------------------------------------------------------------------------------------
class _NullProgressBar:
    def __init__(self, total: int) -> None:
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self.total = self.total if total is None else total
        self.current = min(value, self.total)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


def progress_bar(total: int):
    """ComfyUI's ProgressBar (shown on the running node), or a silent stand-in."""
    return comfy_utils.ProgressBar(total) if IN_COMFYUI else _NullProgressBar(total)


def previews_enabled() -> bool:
    """Whether ComfyUI wants sampling previews: its preview method for this prompt (the frontend's "Live preview
    method" setting, else `--preview-method`) is not "none". Every other method gets the pack's own latent-to-RGB
    preview (core's TAESD and latent2rgb factors do not cover Sana's DC-AE)."""
    if not IN_COMFYUI or comfy_args is None:
        return False
    return comfy_args.preview_method != LatentPreviewMethod.NoPreviews


def preview_image(rgb: torch.Tensor) -> tuple[str, Image.Image, int]:
    """An RGB image (h, w, 3) uint8 -> the preview ComfyUI's ProgressBar sends to the frontend."""
    max_size = comfy_args.preview_size if comfy_args is not None else 512
    return "JPEG", Image.fromarray(rgb.numpy()), max_size


class InterruptProcessingException(Exception):
    """Raised outside ComfyUI when an interrupt was requested (inside ComfyUI, its own exception is raised)."""


_interrupt_lock = threading.Lock()
_interrupt_requested = False


def interrupt_current_processing(value: bool = True) -> None:
    """Request (or withdraw) an interrupt, like ComfyUI's Cancel button."""
    global _interrupt_requested
    if IN_COMFYUI:
        model_management.interrupt_current_processing(value)
        return
    with _interrupt_lock:
        _interrupt_requested = value


def throw_if_interrupted() -> None:
    """Raise if an interrupt was requested, clearing the request (ComfyUI's semantics) so the next run starts clean."""
    global _interrupt_requested
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()
        return
    with _interrupt_lock:
        requested, _interrupt_requested = _interrupt_requested, False
    if requested:
        raise InterruptProcessingException("processing interrupted")
