"""The embedded default job: a few-step run of the whole chain (the full run is `slow`)."""

from __future__ import annotations

import json

import pytest

from training.run import main as run_main
from training.toyjob import CHECKPOINT_NAME, DECODER_NAME, MLLM_NAME, load_exported

TINY = [
    "--teach_steps=3",
    "--teach_batch=4",
    "--mllm_width=64",
    "--mllm_layers=1",
    "--num_queries=4",
    "--connector_depth=1",
    "--decoder_layers=1",
    "--decoder_heads=2",
    "--decoder_head_dim=8",
    "--decoder_patch=4",
    "--head_hold=0.5",
    "--batch_size=4",
    "--pretrain_steps=3",
    "--instruct_steps=2",
    "--eval_two_object=4",
    "--eval_edits=4",
    "--eval_subjects=4",
    "--eval_questions=6",
    "--eval_steps=2",
]


def test_short_chain_exports_models_scores_and_reuses_stages(tmp_path):
    out = tmp_path / "toy"
    assert run_main([f"--out={out}", *TINY]) == 0
    models = out / "models"
    assert (models / "LLM" / MLLM_NAME / "config.json").is_file()
    assert (models / "diffusers" / DECODER_NAME / "model_index.json").is_file()
    assert (models / "metaqueries" / CHECKPOINT_NAME).is_file()
    assert (out / "samples.png").is_file()
    scores = json.loads((out / "scores.json").read_text())
    for task in ("single", "two_object", "edit", "subject"):
        assert {"overall", "seen", "heldout"} <= set(scores[task])
    assert scores["single"]["overall"]["n"] == 90 and scores["single"]["heldout"]["n"] == 12
    assert scores["understanding_unchanged"] is True
    mllm, head, decoder = load_exported(models)
    assert not any(p.requires_grad for p in mllm.model.parameters())

    # a second run reuses every training stage: the exported checkpoint is not rewritten
    stamp = (out / "work" / "instruct" / "metaquery.safetensors").stat().st_mtime_ns
    assert run_main([f"--out={out}", *TINY]) == 0
    assert (out / "work" / "instruct" / "metaquery.safetensors").stat().st_mtime_ns == stamp


def test_unknown_toy_option_is_refused(tmp_path, capsys):
    assert run_main([f"--out={tmp_path}", "--pretrain_stepz=3"]) == 2
    assert "pretrain_stepz" in capsys.readouterr().out


@pytest.mark.slow
def test_full_default_job(tmp_path):
    """The README's main command with its defaults (about 15 minutes on 2 cores)."""
    assert run_main([f"--out={tmp_path / 'toy'}"]) == 0
    scores = json.loads((tmp_path / "toy" / "scores.json").read_text())
    assert scores["understanding_unchanged"] is True
