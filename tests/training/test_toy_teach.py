"""Teaching the toy MLLM: the text-only restate phase comes first, then the task mix; the model ends frozen."""

from __future__ import annotations

import pytest

from metaqueries_core.mllm import load_mllm
from metaqueries_core.tinykit import write_tiny_mllm
from metaqueries_core.toyworld import ToyWorld, all_text
from training.toy import teach as teach_mod
from training.toy.teach import TeachConfig, teach


def test_restate_first_then_the_mix_then_frozen(tmp_path, monkeypatch):
    mllm = load_mllm(write_tiny_mllm("qwen2_5_vl", tmp_path / "mllm", texts=list(all_text())))
    drawn: list[str] = []
    real = teach_mod.example

    def recording(world, task, index, split="train"):
        drawn.append(task)
        return real(world, task, index, split)

    monkeypatch.setattr(teach_mod, "example", recording)
    cfg = TeachConfig(steps=2, restate_first=3, batch_size=4, weights=(1.0, 0.0, 1.0, 0.0, 0.0), warmup=1)
    losses = teach(mllm, ToyWorld(size=32, seed=0), cfg)
    assert len(losses) == 2  # the mixed phase's losses
    assert drawn[:12] == ["restate"] * 12
    assert set(drawn[12:]) <= {"describe", "qa"} and len(drawn) == 20
    assert not mllm.model.training and not any(p.requires_grad for p in mllm.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": (1.0, 1.0)}, "one non-negative weight per task"),
        ({"weights": (0.0,) * 5}, "not all 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"restate_first": -1}, "restate_first >= 0"),
    ],
)
def test_bad_teach_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeachConfig(**kwargs)
