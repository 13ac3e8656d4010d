"""Loaded models own their memory: overwriting or truncating their files afterwards (a re-export under the same name
while ComfyUI keeps the model cached) must neither change them nor crash the process."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from metaqueries_core import checkpoint as ckpt
from metaqueries_core.decoders import load_decoder
from metaqueries_core.mllm import load_mllm


def zero_weight_files(folder: Path) -> int:
    """Overwrite every weight file under `folder` in place (same inode, same size) with zeros; -> files written."""
    files = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
    for path in files:
        size = path.stat().st_size
        with path.open("r+b") as f:  # in place: a memory-mapped view of the file would read the zeros
            f.write(bytes(size))
    return len(files)


def snapshot(modules) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in (*m.parameters(), *m.buffers())]


def unchanged(before: list[torch.Tensor], modules) -> bool:
    after = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_loaded_mllm_and_decoder_survive_their_files_being_overwritten(tmp_path, mllm_folder, decoder_loader):
    mllm_dir = shutil.copytree(mllm_folder("qwen2_5_vl"), tmp_path / "mllm")
    decoder_dir = shutil.copytree(decoder_loader("sana").source, tmp_path / "decoder")
    mllm, decoder = load_mllm(mllm_dir), load_decoder(decoder_dir)
    models = [mllm.model, decoder.denoiser, decoder.vae]
    before = snapshot(models)
    assert zero_weight_files(mllm_dir) and zero_weight_files(decoder_dir) >= 2
    assert unchanged(before, models)


def test_a_loaded_checkpoint_survives_its_file_being_truncated(tmp_path, mllm_loader, decoder_loader, make_head):
    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    head = make_head(mllm, decoder)
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder, stage="pretrain")
    tuned = {k: v + 1 for k, v in decoder.denoiser.state_dict().items()}
    path = ckpt.save_checkpoint(tmp_path / "mq.safetensors", head, config, tuned)
    _, loaded, decoder_state = ckpt.load_checkpoint(path)
    before, tuned_before = snapshot([loaded]), {k: v.clone() for k, v in decoder_state.items()}
    zero_weight_files(tmp_path)
    assert unchanged(before, [loaded])
    assert all(torch.equal(decoder_state[k], v) for k, v in tuned_before.items())
    with path.open("r+b") as f:  # cut short: reading a mapped page past the end would kill the process (SIGBUS)
        f.truncate(100)
    assert unchanged(before, [loaded]) and all(torch.equal(decoder_state[k], v) for k, v in tuned_before.items())


def test_loaded_models_report_the_host_memory_they_hold(mllm_loader, decoder_loader, make_head):
    """ComfyUI's RAM cache weighs cached outputs by get_ram_usage(); without it a loaded MLLM counts as tiny."""
    from metaqueries_core.memory import cpu_bytes
    from nodes.common import MetaQueryCheckpoint

    def nbytes(*modules) -> int:
        return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))

    mllm, decoder = mllm_loader("qwen2_5_vl"), decoder_loader("sana")
    assert mllm.get_ram_usage() == nbytes(mllm.model) > 100_000
    assert decoder.get_ram_usage() == nbytes(decoder.denoiser, decoder.vae) > 0
    head = make_head(mllm, decoder)
    tuned = {k: v.clone() for k, v in decoder.denoiser.state_dict().items()}
    config = ckpt.config_for(head, mllm=mllm, decoder=decoder)
    loaded = MetaQueryCheckpoint("x", Path("x"), config, head, tuned)
    assert loaded.get_ram_usage() == nbytes(head) + nbytes(decoder.denoiser)
    assert cpu_bytes((head, head)) == nbytes(head)  # what is shared counts once
    assert cpu_bytes(tensors=(torch.zeros(4, device="meta"),)) == 0  # not in host memory
