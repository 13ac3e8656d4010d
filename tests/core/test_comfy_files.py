"""The files that make a models folder open in ComfyUI as it is: its extra_model_paths.yaml and the example
workflows' input images (the toy job's export and make_example_models.py both write them)."""

import yaml
from PIL import Image

from metaqueries_core.comfy_files import INPUT_IMAGES, write_example_inputs, write_extra_model_paths


def test_extra_model_paths_yaml_reads_back_with_any_folder_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "my models: #2"  # YAML would misread this unquoted
    models.mkdir()
    path = write_extra_model_paths(models.relative_to(tmp_path), ("LLM", "metaqueries"), "mine")
    assert path == models.relative_to(tmp_path) / "extra_model_paths.yaml"
    config = yaml.safe_load(path.read_text())
    assert config == {"mine": {"base_path": str(models.resolve()), "LLM": "LLM/", "metaqueries": "metaqueries/"}}
    elsewhere = write_extra_model_paths(models, ("LLM",), "mine", path=tmp_path / "staged.new")
    assert yaml.safe_load(elsewhere.read_text())["mine"]["base_path"] == str(models.resolve())


def test_example_inputs_are_toy_world_images_under_the_workflow_names(tmp_path):
    paths = write_example_inputs(tmp_path / "input", size=64)
    assert [p.name for p in paths] == list(INPUT_IMAGES)
    images = [Image.open(p) for p in paths]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # an edit source, then the subject's references
