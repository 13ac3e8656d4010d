"""Fixtures for the node tests: a fake ComfyUI models folder of tiny models (written once per session) that the
pack's folder lookup is pointed at, and the tiny models loaded through the loader nodes."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_example_models, workflow_kit

from make_example_models import (  # noqa: E402
    CHECKPOINT_NAME,
    INTERNVL_NAME,
    MLLM_NAME,
    OPENUNI_NAME,
    SANA_NAME,
    SD15_NAME,
    SD15_TEXT_WIDTH,
    write_checkpoint,
    write_openuni_pth,
)
from reference_kit import write_reference_folder  # noqa: E402

from metaqueries_core.comfy_files import write_example_inputs  # noqa: E402
from nodes import comfy_env  # noqa: E402

SD15_TINY = "tiny-sd15"  # the core tiny SD1.5 decoder (text width 32)
SD15_TINY_CHECKPOINT = "tiny-sd15.safetensors"
WRONG_WIDTH_CHECKPOINT = "for-a-wider-mllm.safetensors"
NESTED_MLLM = "org/nested-qwen"
REFERENCE_NAME = "reference-run/checkpoint-1000"  # a reference trainer checkpoint folder, imported on load


@contextlib.contextmanager
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine every parallel op waits for
    a descheduled thread: one thread runs these tests several times faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def models_root(tmp_path_factory, mllm_folder, decoder_loader):
    """ComfyUI-style models folder of tiny models; comfy_env's folder lookup points at it for the session."""
    root = tmp_path_factory.mktemp("comfy_models")
    with one_thread():
        mllm_dir, internvl_dir = mllm_folder("qwen2_5_vl"), mllm_folder("internvl")
        sana, sd15 = decoder_loader("sana"), decoder_loader("sd15")
    links = {
        f"LLM/{MLLM_NAME}": mllm_dir,
        f"LLM/{INTERNVL_NAME}": internvl_dir,
        f"text_encoders/{NESTED_MLLM}": mllm_dir,
        f"diffusers/{SANA_NAME}": sana.source,
        f"diffusers/{SD15_TINY}": sd15.source,
    }
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target, target_is_directory=True)
    mllm = dict(mllm_family="qwen2_5_vl", mllm_width=64)
    checkpoints = {
        CHECKPOINT_NAME: dict(mllm, decoder_family="sana", decoder_text_width=sana.text_width),
        SD15_NAME: dict(mllm, decoder_family="sd15", decoder_text_width=SD15_TEXT_WIDTH),
        SD15_TINY_CHECKPOINT: dict(mllm, decoder_family="sd15", decoder_text_width=sd15.text_width),
        WRONG_WIDTH_CHECKPOINT: dict(
            mllm_family="qwen2_5_vl", mllm_width=96, decoder_family="sana", decoder_text_width=64
        ),
    }
    with one_thread():
        for name, kw in checkpoints.items():
            write_checkpoint(root / "metaqueries" / name, **kw)
        write_openuni_pth(root / "metaqueries" / OPENUNI_NAME, mllm_width=64, text_width=sana.text_width)
        write_reference_folder(root / "metaqueries" / REFERENCE_NAME, mllm_dir, sana.source, num_queries=4, depth=1)
        write_example_inputs(root.parent / f"{root.name}_input")

    assert not comfy_env.IN_COMFYUI  # the lookup falls back to $METAQUERIES_MODELS_DIR/<key folder>
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAQUERIES_MODELS_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def input_dir(models_root):
    return models_root.parent / f"{models_root.name}_input"


@pytest.fixture(scope="session")
def loaded(models_root):
    """The tiny models loaded once through the loader nodes: name -> node output."""
    from nodes import LoadCheckpoint, LoadDecoder, LoadMLLM

    with one_thread():
        (mllm,) = LoadMLLM().load(MLLM_NAME, "auto", "auto")
        ckpt = {n: LoadCheckpoint().load(n, "auto", "auto")[0] for n in (CHECKPOINT_NAME, SD15_TINY_CHECKPOINT)}
        sana = LoadDecoder().load(SANA_NAME, "auto", "auto", checkpoint=ckpt[CHECKPOINT_NAME])[0]
        sd15 = LoadDecoder().load(SD15_TINY, "auto", "auto", checkpoint=ckpt[SD15_TINY_CHECKPOINT])[0]
    return {"mllm": mllm, "checkpoint": ckpt[CHECKPOINT_NAME], "sana": sana, "sd15": sd15, **ckpt}
