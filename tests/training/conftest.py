"""Fixtures of the trainer tests: a clean accelerate state per test and the tiny model folders they train."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test's run must start from scratch."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def folders(mllm_folder, decoder_loader):
    return mllm_folder("qwen2_5_vl"), decoder_loader("sana").source
