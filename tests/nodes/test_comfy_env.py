"""comfy_env: folder registration that never clobbers the user's paths, folder listing, devices, interrupt flag."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from nodes import comfy_env


def fake_folder_paths(models_dir: str, keys: dict[str, tuple[list[str], set[str]]]) -> types.SimpleNamespace:
    """A stand-in for ComfyUI's folder_paths with its documented behaviour: add a path to a key (created if
    missing) unless it is already there."""
    table = {k: (list(paths), set(exts)) for k, (paths, exts) in keys.items()}

    def add_model_folder_path(key: str, path: str, is_default: bool = False) -> None:
        if key not in table:
            table[key] = ([path], set())
        elif path not in table[key][0]:
            table[key][0].append(path)

    return types.SimpleNamespace(
        models_dir=models_dir,
        folder_names_and_paths=table,
        add_model_folder_path=add_model_folder_path,
        get_folder_paths=lambda key: list(table[key][0]),
    )


def test_registration_adds_defaults_after_the_users_paths(monkeypatch):
    fake = fake_folder_paths(
        "/comfy/models",
        {
            "LLM": (["/data/llm"], set()),  # set by extra_model_paths.yaml
            "text_encoders": (["/comfy/models/text_encoders", "/comfy/models/clip"], {".safetensors"}),
            "diffusers": (["/comfy/models/diffusers"], {"folder"}),
        },
    )
    monkeypatch.setattr(comfy_env, "folder_paths", fake)
    monkeypatch.setattr(comfy_env, "IN_COMFYUI", True)
    comfy_env.register_model_folders()
    comfy_env.register_model_folders()  # idempotent
    table = fake.folder_names_and_paths
    assert table["LLM"][0] == ["/data/llm", "/comfy/models/LLM"]  # the user's path keeps priority
    assert table["text_encoders"] == (["/comfy/models/text_encoders", "/comfy/models/clip"], {".safetensors"})
    assert table["diffusers"] == (["/comfy/models/diffusers"], {"folder"})
    assert table["metaqueries"] == (["/comfy/models/metaqueries"], {".safetensors"})  # a key we created
    assert comfy_env.folder_roots("LLM") == [Path("/data/llm"), Path("/comfy/models/LLM")]
    assert comfy_env.folder_roots("unregistered") == []


def test_listing_finds_model_folders_at_any_depth_but_not_inside_models(tmp_path, monkeypatch):
    for folder in ("a-model", "org/b-model", "org/b-model/sub-with-config", "not-a-model/empty"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("a-model", "org/b-model", "org/b-model/sub-with-config"):
        (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / "org" / "x.safetensors").write_bytes(b"")
    monkeypatch.setattr(comfy_env, "folder_roots", lambda key: [tmp_path, tmp_path / "missing"])
    found = comfy_env.list_folders(("LLM",), lambda p: (p / "config.json").is_file())
    assert found == ["a-model", "org/b-model"]
    assert comfy_env.list_files(("metaqueries",), ".safetensors") == ["org/x.safetensors"]
    assert comfy_env.resolve(("LLM",), "org/b-model", "MLLM folder") == tmp_path / "org" / "b-model"


def test_checkpoint_files_in_linked_folders_are_listed_once(tmp_path, monkeypatch):
    store, root = tmp_path / "store", tmp_path / "metaqueries"
    (store / "deep").mkdir(parents=True)
    root.mkdir()
    (store / "shared.safetensors").write_bytes(b"")
    (store / "deep" / "more.safetensors").write_bytes(b"")
    (root / "own.safetensors").write_bytes(b"")
    (root / "linked").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(store, target_is_directory=True)  # a link back up must not recurse forever
    monkeypatch.setattr(comfy_env, "folder_roots", lambda key: [root])
    assert comfy_env.list_files(("metaqueries",), ".safetensors") == [
        "linked/deep/more.safetensors",
        "linked/shared.safetensors",
        "own.safetensors",
    ]


def test_loaders_are_run_again_when_their_model_files_change(tmp_path, monkeypatch):
    """IS_CHANGED of the three loaders: equal while the files are, different once one is re-exported."""
    from nodes.loaders import LoadCheckpoint, LoadDecoder, LoadMLLM

    for folder in ("llm/m", "decoders/d/transformer"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "llm/m/model.safetensors").write_bytes(b"a" * 10)
    (tmp_path / "decoders/d/transformer/w.safetensors").write_bytes(b"b" * 10)
    (tmp_path / "c.safetensors").write_bytes(b"c" * 10)
    roots = {"LLM": [tmp_path / "llm"], "diffusers": [tmp_path / "decoders"], "metaqueries": [tmp_path]}
    monkeypatch.setattr(comfy_env, "folder_roots", lambda key: roots.get(key, []))
    cases = [
        (LoadMLLM.IS_CHANGED, {"mllm_name": "m"}, "llm/m/model.safetensors"),
        (LoadDecoder.IS_CHANGED, {"decoder_name": "d", "checkpoint": None}, "decoders/d/transformer/w.safetensors"),
        (LoadCheckpoint.IS_CHANGED, {"checkpoint_name": "c.safetensors"}, "c.safetensors"),
    ]
    for is_changed, inputs, weights in cases:
        first = is_changed(**inputs, dtype="auto", device="auto")
        assert is_changed(**inputs, dtype="fp32", device="cpu") == first  # widgets are ComfyUI's own business
        (tmp_path / weights).write_bytes(b"x" * 11)  # re-exported under the same name
        assert is_changed(**inputs, dtype="auto", device="auto") != first, weights
    missing = LoadMLLM.IS_CHANGED(mllm_name="gone", dtype="auto", device="auto")
    assert "'gone' not found" in missing  # the load itself then reports it


def test_fallback_models_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setattr(comfy_env, "IN_COMFYUI", False)
    monkeypatch.setenv("METAQUERIES_MODELS_DIR", str(tmp_path))
    assert comfy_env.folder_roots("LLM") == [tmp_path / "LLM"]
    assert comfy_env.folder_roots("metaqueries") == [tmp_path / "metaqueries"]


def test_devices_and_dtypes():
    assert comfy_env.torch_device("cpu") == torch.device("cpu")
    assert comfy_env.torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert comfy_env.torch_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="not in"):
        comfy_env.torch_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            comfy_env.torch_device("cuda")
        assert comfy_env.torch_device("auto") == torch.device("cpu")


def test_interrupt_flag_is_consumed_by_the_check():
    comfy_env.throw_if_interrupted()  # nothing requested
    comfy_env.interrupt_current_processing()
    with pytest.raises(comfy_env.InterruptProcessingException):
        comfy_env.throw_if_interrupted()
    comfy_env.throw_if_interrupted()  # the request was consumed
    comfy_env.interrupt_current_processing()
    comfy_env.interrupt_current_processing(False)  # withdrawn
    comfy_env.throw_if_interrupted()


def test_progress_bar_stand_in_clamps_like_comfyui():
    bar = comfy_env.progress_bar(3)
    bar.update_absolute(5)
    assert bar.current == 3
    bar.update_absolute(1)
    bar.update(1)
    assert bar.current == 2
