"""Files that make a models folder usable from ComfyUI as it is: an `extra_model_paths.yaml` that registers it, and
the input images the example workflows' LoadImage nodes name (toy-world images). No ComfyUI import: the toy job and
`tests/nodes/make_example_models.py` write them outside ComfyUI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from PIL import Image

from .toyworld import ToyWorld

__all__ = [
    "EXTRA_MODEL_PATHS",
    "INPUT_IMAGES",
    "example_inputs",
    "write_example_inputs",
    "write_extra_model_paths",
]

EXTRA_MODEL_PATHS = "extra_model_paths.yaml"
# the names the example workflows' LoadImage nodes use: an edit source, then two views of one subject
INPUT_IMAGES = (
    "metaqueries_example_source.png",
    "metaqueries_example_subject_1.png",
    "metaqueries_example_subject_2.png",
)


def write_extra_model_paths(models_dir: Path, keys: Sequence[str], section: str, path: Path | None = None) -> Path:
    """A ComfyUI extra_model_paths.yaml with one section whose base_path is `models_dir` (made absolute) and which
    maps each model folder key to the subfolder of the same name (`LLM: LLM/`), so `python main.py
    --extra-model-paths-config <it>` finds the models there. Written to `path` (default `models_dir/EXTRA_MODEL_PATHS`;
    another place for a caller that writes beside the target and moves it there)."""
    config = {section: {"base_path": str(Path(models_dir).resolve()), **{key: f"{key}/" for key in keys}}}
    path = Path(models_dir) / EXTRA_MODEL_PATHS if path is None else path
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")  # quotes a base_path that needs it
    return path


def example_inputs(size: int = 32) -> dict[str, Image.Image]:
    """`INPUT_IMAGES` name -> its image at `size` px: the first training edit source of the seed-0 toy world (a white
    circle: the editing and understanding workflows ask about "the circle") and two references of its first
    subject-driven sample. Always seed 0, whatever a job's seed: the workflows' prompts were written for these."""
    world = ToyWorld(size=size)
    subject = world.subject_sample("train", 0, n_refs=2).references
    return dict(zip(INPUT_IMAGES, (world.edit_sample("train", 0).source_image, *subject), strict=True))


def write_example_inputs(folder: Path, size: int = 32) -> list[Path]:
    """`example_inputs` saved as PNGs under their names in `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in example_inputs(size).items():
        image.save(folder / name)
        paths.append(folder / name)
    return paths
