"""The example workflows: valid UI-format graphs of known nodes whose links and widget values fit the schemas, and
that run in-process on the tiny models (core image I/O replaced by stand-ins; core KSampler replaced by a check of
the CONDITIONING it would receive)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from build_example_workflows import WORKFLOWS
from PIL import Image
from workflow_kit import CORE_NODES, VIRTUAL_NODES, WORKFLOW_DIR, check_workflow, execute, widget_values

from nodes import NODE_CLASS_MAPPINGS

# Core nodes the workflows may use (their schemas are copied in workflow_kit.CORE_NODES).
KNOWN_CORE = {
    "LoadImage",
    "SaveImage",
    "PreviewImage",
    "PreviewAny",
    "CheckpointLoaderSimple",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "Note",
}
FOLDER_OF_LOADER = {
    "MetaQueries_LoadMLLM": "models/LLM/",
    "MetaQueries_LoadCheckpoint": "models/metaqueries/",
    "MetaQueries_LoadDecoder": "models/diffusers/",
    "CheckpointLoaderSimple": "models/checkpoints/",
}


def load(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def test_every_example_workflow_is_covered():
    assert {p.stem for p in WORKFLOW_DIR.glob("*.json")} == set(WORKFLOWS)
    assert set(CORE_NODES) == KNOWN_CORE


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_is_a_sound_ui_graph(models_root, name):
    doc = load(name)
    assert doc["version"] == 0.4 and isinstance(doc["nodes"], list) and isinstance(doc["links"], list)
    types = {n["type"] for n in doc["nodes"]}
    assert types <= set(NODE_CLASS_MAPPINGS) | KNOWN_CORE, types - set(NODE_CLASS_MAPPINGS) - KNOWN_CORE
    assert check_workflow(doc) == []  # links typed as the schemas say, widgets in range / in the choice lists
    notes = [n["widgets_values"][0] for n in doc["nodes"] if n["type"] in VIRTUAL_NODES]
    assert len(notes) == 1
    for node in doc["nodes"]:
        if node["type"] in FOLDER_OF_LOADER:
            model = node["widgets_values"][0]
            assert f"{FOLDER_OF_LOADER[node['type']]}{model}" in notes[0], f"the note does not name {model}"


def image_file(input_dir, image: str, upload: str = "image") -> tuple:
    array = np.asarray(Image.open(input_dir / image).convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array)[None]  # (1, H, W, 3)
    return pixels, torch.zeros(pixels.shape[1:3])


class CoreStandIns:
    """Core nodes in-process: image I/O for real, the SD1.5 model path as checks of what core would receive."""

    def __init__(self, input_dir) -> None:
        self.saved, self.previews, self.ksampler = [], [], []
        self.input_dir = input_dir

    def functions(self) -> dict:
        return {
            "LoadImage": lambda image: image_file(self.input_dir, image),
            "SaveImage": lambda images, filename_prefix: self.saved.append(images) or (),
            "PreviewImage": lambda images: self.saved.append(images) or (),
            "PreviewAny": lambda source: self.previews.append(source) or (),
            "CheckpointLoaderSimple": lambda ckpt_name: ("MODEL", None, "VAE"),
            "EmptyLatentImage": lambda width, height, batch_size: (
                {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},
            ),
            "KSampler": self.ksample,
            "VAEDecode": lambda samples, vae: (torch.zeros(samples["samples"].shape[0], 64, 64, 3),),
        }

    def ksample(self, model, positive, negative, latent_image, **widgets) -> tuple:
        self.ksampler.append((positive, negative, latent_image))
        return (latent_image,)


def check_core_conditioning(conditioning, width: int) -> None:
    """What core KSampler's SD1.x path reads: a list of [tensor (B, T, D), dict]; the dict is copied and may only
    carry keys core understands (here none are needed)."""
    assert isinstance(conditioning, list) and len(conditioning) == 1
    entry = conditioning[0]
    assert isinstance(entry, list) and len(entry) == 2
    tensor, extras = entry
    assert torch.is_tensor(tensor) and tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[2] == width
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and torch.isfinite(tensor).all()
    assert isinstance(extras, dict) and set(extras) <= {"pooled_output", "attention_mask"}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_runs(models_root, input_dir, name):
    doc = load(name)
    core = CoreStandIns(input_dir)
    results = execute(doc, core.functions())
    samplers = [n for n in doc["nodes"] if n["type"] == "MetaQueries_DiffusionSample"]
    if name == "understanding":
        assert len(core.previews) == 1 and isinstance(core.previews[0], str)
    elif name == "sd15_core_ksampler":
        ((positive, negative, latent),) = core.ksampler
        for conditioning in (positive, negative):
            check_core_conditioning(conditioning, width=768)
        assert latent["samples"].shape == (1, 4, 8, 8)
    else:
        (sampler,) = samplers
        widgets = widget_values(sampler)
        (image,) = core.saved
        assert image is results[sampler["id"]][0]
        assert image.shape == (widgets["batch_size"], widgets["height"], widgets["width"], 3)
        assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
        assert torch.isfinite(image).all()
