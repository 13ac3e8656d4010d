"""Written files get the permissions of a new file under the umask, not safetensors' owner-only 0600: a ComfyUI
server running as another user must be able to read an exported model."""

from __future__ import annotations

import os
import stat

import pytest
from mq_testutil import file_modes, odd_modes, umask

from metaqueries_core import checkpoint as ckpt
from metaqueries_core.decoders.tiny import write_sd15_single_file, write_tiny_sana, write_tiny_sd15
from metaqueries_core.file_modes import apply_umask, apply_umask_to_writes, current_umask
from metaqueries_core.tinykit import write_tiny_mllm

MASKS = [0o022, 0o077]  # 0644 files (readable by all), 0600 files (a user who wants them private keeps that)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_current_umask_is_the_process_umask_and_stays_it(mask):
    with umask(mask):
        assert current_umask() == mask
        assert os.umask(mask) == mask  # reading it changed nothing


@pytest.mark.parametrize("mask", MASKS)
def test_saved_checkpoint_has_the_umask_mode(tmp_path, mllm_loader, decoder_loader, make_head, mask):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder)
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder)
    with umask(mask):
        path = ckpt.save_checkpoint(tmp_path / "out" / "mq.safetensors", head, config)
        path = ckpt.save_checkpoint(path, head, config)  # replacing it: the new file is the one that counts
    assert odd_modes(tmp_path, mask) == {}
    assert mode(path) == 0o666 & ~mask


@pytest.mark.parametrize("mask", MASKS)
def test_tiny_model_folders_have_the_umask_mode(tmp_path, mask):
    with umask(mask):
        write_tiny_mllm("qwen2_5_vl", tmp_path / "mllm")
        sana = write_tiny_sana(tmp_path / "sana")
        write_tiny_sd15(tmp_path / "sd15")
        write_sd15_single_file(tmp_path / "single" / "sd15.safetensors", folder=tmp_path / "sd15")
    assert (sana / "transformer" / "diffusion_pytorch_model.safetensors").is_file()  # what safetensors made 0600
    assert odd_modes(tmp_path, mask) == {}


def test_a_file_the_user_had_in_a_model_folder_keeps_its_mode(tmp_path):
    folder = tmp_path / "sana"
    (folder / "transformer").mkdir(parents=True)
    private, weights = folder / "notes.txt", folder / "transformer" / "diffusion_pytorch_model.safetensors"
    private.write_text("mine")
    private.chmod(0o600)
    weights.write_bytes(b"an older copy")
    weights.chmod(0o600)
    with umask(0o022):
        write_tiny_sana(folder)
    assert mode(private) == 0o600  # left alone: not written here
    assert mode(weights) == 0o644  # rewritten: this code's file now


def test_apply_umask_to_writes_changes_only_what_the_block_wrote(tmp_path):
    kept, rewritten, replaced = (tmp_path / name for name in ("kept", "rewritten", "replaced"))
    for path in (kept, rewritten, replaced):
        path.write_text("before")
        path.chmod(0o600)
    os.utime(rewritten, ns=(0, 0))  # an old file: rewriting it now gives it a new mtime
    with umask(0o022), apply_umask_to_writes(tmp_path):
        rewritten.write_text("after")
        (tmp_path / "new.tmp").write_text("new")
        (tmp_path / "new.tmp").chmod(0o600)
        os.replace(tmp_path / "new.tmp", replaced)
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "added").write_text("added")
        (tmp_path / "sub" / "added").chmod(0o600)
    assert file_modes(tmp_path) == {
        "kept": 0o600,
        "replaced": 0o644,
        "rewritten": 0o644,
        "sub/": 0o755,
        "sub/added": 0o644,
    }


def test_apply_umask_leaves_links_and_what_they_point_at(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("someone else's")
    target.chmod(0o600)
    folder = tmp_path / "written"
    folder.mkdir()
    (folder / "link").symlink_to(target)
    (folder / "own").write_text("ours")
    (folder / "own").chmod(0o600)
    with umask(0o022):
        apply_umask(folder)
    assert (mode(target), mode(folder / "own")) == (0o600, 0o644)
