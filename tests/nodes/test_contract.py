"""Every node's V1 contract (schema, tooltips, return types, pack prefixes) and that the pack imports like ComfyUI
imports it, without ComfyUI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import nodes
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

CORE_TYPES = {"IMAGE", "LATENT", "CONDITIONING", "STRING", "INT", "FLOAT", "BOOLEAN"}
PACK_TYPES = {"MQ_MLLM", "MQ_CHECKPOINT", "MQ_DECODER", "MQ_QUERY_STATES"}
EXPECTED_NODES = {
    "MetaQueries_LoadMLLM",
    "MetaQueries_LoadCheckpoint",
    "MetaQueries_LoadDecoder",
    "MetaQueries_Encode",
    "MetaQueries_Connector",
    "MetaQueries_EditConditioning",
    "MetaQueries_DiffusionSample",
    "MetaQueries_Describe",
}


def test_the_pack_registers_every_node_with_a_display_name():
    assert set(NODE_CLASS_MAPPINGS) == EXPECTED_NODES
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_NODES
    assert all(NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_contract(node_id, models_root):
    cls = NODE_CLASS_MAPPINGS[node_id]
    schema = cls.INPUT_TYPES()
    assert set(schema) <= {"required", "optional", "hidden"} and schema["required"]
    for section in ("required", "optional"):
        for name, entry in schema.get(section, {}).items():
            assert isinstance(entry, tuple) and len(entry) == 2, f"{name}: (type, options) expected"
            kind, options = entry
            assert isinstance(options, dict) and options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):  # COMBO
                assert all(isinstance(c, str) for c in kind)
                assert "default" not in options or options["default"] in kind
            else:
                assert kind in CORE_TYPES | PACK_TYPES, f"{node_id}.{name}: type {kind!r} is neither core nor MQ_"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"]
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert set(cls.RETURN_TYPES) <= CORE_TYPES | PACK_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY.startswith("MetaQueries/") and cls.DESCRIPTION.strip()


def test_seed_gets_the_frontend_control_widget():
    options = NODE_CLASS_MAPPINGS["MetaQueries_DiffusionSample"].INPUT_TYPES()["required"]["seed"][1]
    assert options["control_after_generate"] is True and options["max"] == 0xFFFFFFFFFFFFFFFF


def test_loaders_list_the_models_folders(models_root):
    from conftest import NESTED_MLLM, REFERENCE_NAME, SD15_TINY

    mllms = NODE_CLASS_MAPPINGS["MetaQueries_LoadMLLM"].INPUT_TYPES()["required"]["mllm_name"][0]
    checkpoints = NODE_CLASS_MAPPINGS["MetaQueries_LoadCheckpoint"].INPUT_TYPES()["required"]["checkpoint_name"][0]
    decoders = NODE_CLASS_MAPPINGS["MetaQueries_LoadDecoder"].INPUT_TYPES()["required"]["decoder_name"][0]
    assert mllms == sorted(
        ["metaqueries-toy-qwen2_5_vl", "metaqueries-toy-internvl", NESTED_MLLM]
    )  # LLM + text_encoders
    assert "metaqueries-toy.safetensors" in checkpoints and "metaqueries-toy-openuni.pth" in checkpoints
    assert REFERENCE_NAME in checkpoints  # a reference trainer folder, imported on load; its shards are not listed
    assert not any(c.startswith(f"{REFERENCE_NAME}/") for c in checkpoints)
    others = [c for c in checkpoints if c != REFERENCE_NAME]
    assert all(c.endswith((".safetensors", ".pth")) for c in others)  # .pth: OpenUni's, imported on load
    assert decoders == sorted(["metaqueries-toy-sana", SD15_TINY])


def test_the_pack_imports_as_comfyui_imports_it_without_comfyui():
    """ComfyUI loads the pack folder's __init__.py under a module name of its own; it must not need ComfyUI."""
    root = Path(nodes.__file__).resolve().parents[1]
    name = "metaqueries_pack_under_test"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == EXPECTED_NODES
        assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
