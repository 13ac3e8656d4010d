"""Sample grids under FSDP: sharded modules cannot sample on one process; whole copies built from the gathered state
dict sample exactly as the trained modules do. Sharding is real FSDP2 (`fully_shard`) over a one-process gloo group,
which runs on a CPU. FSDP or DeepSpeed launched where they cannot run is refused with a message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from mq_testutil import trainer_args
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from metaqueries_core.decoders import load_decoder
from metaqueries_core.sampling import generate
from training import trainer
from training.config import RunConfig
from training.config_io import load_config
from training.model_setup import build_head, set_decoder_mode
from training.preflight import SetupError
from training.run import main
from training.trainer import TrainStep
from training.whole_weights import sampling_decoder, whole_head

REPO = Path(__file__).resolve().parents[2]

FSDP = SimpleNamespace(distributed_type=DistributedType.FSDP)  # what sampling_decoder reads of the Accelerator
DDP = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
PROMPTS = ["a red circle on the left", "two blue squares"]


def trained_step(folders, mllm_loader, mode: str):
    """A TrainStep whose head and denoiser differ from what the folders hold (as after training)."""
    cfg = load_config(RunConfig, None, trainer_args(folders, Path("unused"), f"--model.decoder_mode={mode}"))
    mllm, decoder = mllm_loader("qwen2_5_vl"), load_decoder(folders[1])
    torch.manual_seed(0)
    head = build_head(cfg.model, mllm, decoder)
    set_decoder_mode(decoder, mode, 2)
    with torch.no_grad():
        for p in [*head.parameters(), *(p for p in decoder.denoiser.parameters() if p.requires_grad)]:
            p.add_(0.05 * torch.randn_like(p))
    return cfg, mllm, decoder, TrainStep(head, mllm, decoder, prefix_cache=False)


def sample(mllm, head, decoder) -> torch.Tensor:
    return generate(mllm, head, decoder, PROMPTS, height=32, width=32, steps=2, seed=0)  # (B, 3, H, W)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_whole_copies_sample_like_the_trained_modules(folders, mllm_loader, mode):
    cfg, mllm, decoder, step = trained_step(folders, mllm_loader, mode)
    state = step.state_dict()
    head, copy = whole_head(step.head, state), sampling_decoder(FSDP, decoder, cfg.model, state, mllm.device)
    assert head is not step.head and copy is not decoder  # fresh modules, loaded from the state and the folder
    with torch.no_grad():
        expected = sample(mllm, step.head, decoder)
        torch.testing.assert_close(sample(mllm, head, copy), expected, atol=1e-5, rtol=1e-4)  # LoRA: merged
    assert sampling_decoder(DDP, decoder, cfg.model, state, mllm.device) is decoder  # whole already


def test_a_frozen_denoiser_is_sampled_as_it_is(folders, mllm_loader):
    cfg, mllm, decoder, step = trained_step(folders, mllm_loader, "frozen")
    assert sampling_decoder(FSDP, decoder, cfg.model, step.state_dict(), mllm.device) is decoder


def test_fsdp_shards_cannot_sample_but_whole_copies_of_the_gathered_state_can(folders, mllm_loader, tmp_path):
    cfg, mllm, decoder, step = trained_step(folders, mllm_loader, "full")
    with torch.no_grad():
        expected = sample(mllm, step.head, decoder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))  # the models are on the CPU, also on a machine with a GPU
        # what configs/accelerate/fsdp.yaml wraps: connector layers and Sana blocks, then the whole TrainStep
        for block in [*step.head.connector.layers, *decoder.denoiser.transformer_blocks]:
            fully_shard(block, mesh=mesh)
        fully_shard(step, mesh=mesh)
        with torch.no_grad(), pytest.raises(RuntimeError, match="DTensor"):
            sample(mllm, step.head, decoder)  # what the final grid did on a GPU before whole copies
        state = get_model_state_dict(step, options=StateDictOptions(full_state_dict=True))
        head, copy = whole_head(step.head, state), sampling_decoder(FSDP, decoder, cfg.model, state, mllm.device)
        with torch.no_grad():
            torch.testing.assert_close(sample(mllm, head, copy), expected, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_the_fsdp_config_wraps_classes_the_trained_modules_have(folders, mllm_loader, mode):
    """configs/accelerate/fsdp.yaml names connector layers and Sana blocks; a frozen decoder brings no Sana blocks,
    which accelerate's wrap policy stops on: the trainer names the option to launch with instead."""
    wrap = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    names = wrap["fsdp_transformer_layer_cls_to_wrap"]
    _, _, _, step = trained_step(folders, mllm_loader, mode)
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=names)
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    if mode == "full":
        trainer.check_fsdp_wrap(acc, step)  # every named class is there
        return
    with pytest.raises(
        SetupError, match=r"\['SanaTransformerBlock'\], which .* --fsdp_transformer_layer_cls_to_wrap Enc"
    ):
        trainer.check_fsdp_wrap(acc, step)
    plugin.transformer_cls_names_to_wrap = "EncoderLayer"  # what that option sets
    trainer.check_fsdp_wrap(acc, step)


@pytest.mark.parametrize(
    "kind, says",
    [
        ("FSDP", "the launcher asked for fsdp but accelerate set up"),
        # without deepspeed installed accelerate's own ImportError (pip install deepspeed); with it, the refusal
        ("DEEPSPEED", "deepspeed"),
    ],
)
def test_a_launch_that_cannot_run_without_a_gpu_is_one_message(folders, tmp_path, monkeypatch, capsys, kind, says):
    monkeypatch.setattr(trainer, "has_accelerator", lambda: False)  # a machine without GPUs, wherever this runs
    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")  # as `accelerate launch --config_file ...` sets it
    AcceleratorState._reset_state(True)
    try:
        assert main(trainer_args(folders, tmp_path / "run", "--train.steps=2")) == 1
    finally:
        AcceleratorState._reset_state(True)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err.lower()
    assert not (tmp_path / "run").exists()  # refused before anything was written
