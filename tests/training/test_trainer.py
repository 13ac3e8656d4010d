"""The training loop end to end on tiny models (CPU, float32): every data format, both stages, every decoder mode,
learning on a fixed batch, and the node checkpoint it exports."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from mq_testutil import merged, trainer_args
from PIL import Image
from safetensors.torch import load_file

from metaqueries_core.checkpoint import check_compatible, load_checkpoint
from metaqueries_core.decoders import load_decoder
from metaqueries_core.toyworld import ToyWorld
from training.batches import to_model_batch
from training.config import RunConfig
from training.config_io import load_config
from training.data.samples import CaptionSample
from training.model_setup import build_head, merge_lora_state, set_decoder_mode
from training.optim import make_optimizer
from training.run_log import read_metrics
from training.trainer import TrainStep, accumulate, train

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None


@pytest.fixture(scope="module")
def folders(mllm_folder, decoder_loader):
    """(tiny Qwen2.5-VL folder, tiny Sana folder, tiny SD1.5 folder), written once per session."""
    return mllm_folder("qwen2_5_vl"), decoder_loader("sana").source, decoder_loader("sd15").source


def run_args(folders, out: Path, *extra: str, decoder: int = 1) -> list[str]:
    return trainer_args((folders[0], folders[decoder]), out, *merged(["--train.steps=3"], extra))


def run(folders, out: Path, *extra: str, decoder: int = 1) -> Path:
    return train(load_config(RunConfig, None, run_args(folders, out, *extra, decoder=decoder)))


# ---------------------------------------------------------------------------------------------- small datasets


def png(i: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 40 % 256, 90, 255 - i * 30 % 256)).save(buf, format="PNG")
    return buf.getvalue()


BROKEN = png(0)[:60]  # a PNG whose image data is cut off


def make_dataset(root: Path, kind: str, n: int = 6) -> Path:
    """n pretrain samples of format `kind` (webdataset: plus one corrupt image that must be skipped and counted)."""
    if kind == "webdataset":
        root.mkdir()
        with tarfile.open(root / "00000.tar", "w") as tar:
            members = [(f"{i:04d}", png(i), f"caption {i}") for i in range(n)]
            members.insert(2, ("bad", BROKEN, "broken image"))
            for key, image, caption in members:
                for ext, data in (("png", image), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return root
    if kind == "jsonl":
        root.mkdir()
        lines = []
        for i in range(n):
            (root / f"{i}.png").write_bytes(png(i))
            lines.append(json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}))
        (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        return root
    if kind == "hf":
        if pa is None:
            pytest.skip("pyarrow is not installed")
        root.mkdir()
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        images = pa.array([{"bytes": png(i), "path": None} for i in range(n)], struct)
        pq.write_table(pa.table({"image": images, "caption": [f"caption {i}" for i in range(n)]}), root / "d.parquet")
        return root
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["toyworld", "webdataset", "hf", "jsonl"])
def test_each_data_format_trains_and_exports_a_loadable_checkpoint(folders, tmp_path, kind, mllm_loader):
    data = [] if kind == "toyworld" else [f"--data.kind={kind}", f"--data.path={make_dataset(tmp_path / 'data', kind)}"]
    export = run(folders, tmp_path / "run", *data)
    config, head, decoder_state = load_checkpoint(export)
    check_compatible(config, mllm=mllm_loader("qwen2_5_vl"), decoder=load_decoder(folders[1]))
    assert config.stage == "pretrain" and head.num_queries == 4 and decoder_state == {}
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if kind == "webdataset":  # the corrupt image was skipped, counted, and the batches stayed full
        assert records[-1]["skipped/decode_error"] == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["replica_fingerprints"]) == 1


def test_instruct_stage_starts_from_the_pretrain_export_and_carries_its_decoder(folders, tmp_path):
    pre = run(folders, tmp_path / "pre", "--model.decoder_mode=full", "--train.steps=2")
    inst = run(folders, tmp_path / "inst", "--train.stage=instruct", f"--model.init_checkpoint={pre}")
    pre_cfg, pre_head, pre_dec = load_checkpoint(pre)
    cfg, head, dec = load_checkpoint(inst)
    assert pre_cfg.stage == "pretrain" and cfg.stage == "instruct"
    # the frozen decoder of the instruct stage is the pretrain-trained one, and it travels on in the export
    assert pre_dec and dec.keys() == pre_dec.keys() and all(torch.equal(dec[k], pre_dec[k]) for k in dec)
    assert not torch.equal(head.queries.queries, pre_head.queries.queries)  # the head trained on


@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_decoder_modes_train_what_they_say(folders, tmp_path, mode):
    rank = ["--model.lora_rank=2"] if mode == "lora" else []
    export = run(folders, tmp_path / "run", f"--model.decoder_mode={mode}", *rank, "--optim.lr=1e-2")
    _, _, decoder_state = load_checkpoint(export)
    original = load_decoder(folders[1]).denoiser.state_dict()
    if mode == "frozen":
        assert decoder_state == {}
        return
    fresh = load_decoder(folders[1])
    fresh.denoiser.load_state_dict(decoder_state, strict=True)  # plain denoiser keys, no peft names
    changed = {k for k in original if not torch.equal(original[k], decoder_state[k])}
    assert changed
    if mode == "lora":  # only the adapted attention projections moved (their merged B A update)
        assert all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in k for k in changed)
        assert all(k.endswith(".weight") for k in changed)
    else:
        assert any(".ff." in k or "proj_out" in k or "patch_embed" in k for k in changed)


@pytest.mark.parametrize("prefix_cache", ["true", "false"])
def test_gradient_checkpointing_changes_memory_not_results(folders, tmp_path, prefix_cache):
    """train.gradient_checkpointing recomputes the MLLM's layers on the query pass, the connector's and the trained
    decoder's: the export and the losses must be the ones of a run without it, bit for bit."""
    common = ("--model.decoder_mode=full", "--optim.lr=1e-2", f"--train.prefix_cache={prefix_cache}")
    plain = run(folders, tmp_path / "plain", *common)
    recomputed = run(folders, tmp_path / "ckpt", *common, "--train.gradient_checkpointing=true")
    a, b = load_file(plain), load_file(recomputed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")] for name in ("plain", "ckpt")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("family", ["sana", "sd15"])
def test_lora_trains_only_adapters_and_merges_exactly(folders, family):
    decoder = load_decoder(folders[1 if family == "sana" else 2])
    set_decoder_mode(decoder, "lora", 2)
    trainable = [n for n, p in decoder.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt, _ = make_optimizer({"decoder": decoder.denoiser}, load_config(RunConfig).optim, 10)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in decoder.denoiser.parameters() if p.requires_grad}
    torch.manual_seed(0)
    for name, p in decoder.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # B starts at zero; make the update visible
    latents = torch.randn(2, decoder.latent_channels, 8, 8)  # (B, c, h, w)
    cond = torch.randn(2, 4, decoder.text_width)  # (B, T, C)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        adapted = decoder.predict(latents, t, cond)  # through the peft wrapper (reads denoiser.config)
    plain = load_decoder(folders[1 if family == "sana" else 2])
    plain.denoiser.load_state_dict(merge_lora_state(decoder.denoiser.state_dict(), 1.0), strict=True)
    with torch.no_grad():
        merged = plain.predict(latents, t, cond)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)


def test_loss_decreases_on_a_fixed_batch(folders, mllm_loader):
    cfg = load_config(RunConfig, None, run_args(folders, Path("unused"), "--optim.lr=3e-3"))
    acc = Accelerator(cpu=True)
    mllm, decoder = mllm_loader("qwen2_5_vl"), load_decoder(folders[1])
    torch.manual_seed(0)
    head = build_head(cfg.model, mllm, decoder)
    set_decoder_mode(decoder, "full", 0)
    roles = {"queries": head.queries, "connector": head.connector, "decoder": decoder.denoiser}
    opt, sched = make_optimizer(roles, cfg.optim, 1000)
    step_module, opt, sched = acc.prepare(TrainStep(head, mllm, decoder, prefix_cache=True), opt, sched)
    world = ToyWorld(size=32, seed=0)
    toy = [world.caption_sample("train", i) for i in range(4)]
    mb = to_model_batch([CaptionSample(s.image, s.caption, f"toy#{i}") for i, s in enumerate(toy)])
    losses = [accumulate(acc, step_module, opt, sched, mb, cfg, seed=7)[0] for _ in range(15)]
    assert all(b < a for a, b in zip(losses[:5], losses[1:6])), losses  # steadily down at first
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_mllm_parameters_that_would_train_stop_the_run(folders, tmp_path, monkeypatch):
    import training.model_setup as model_setup

    real = model_setup.load_mllm

    def leaky(*args, **kwargs):
        adapter = real(*args, **kwargs)
        next(adapter.model.parameters()).requires_grad_(True)
        return adapter

    monkeypatch.setattr(model_setup, "load_mllm", leaky)
    with pytest.raises(RuntimeError, match="the MLLM must be frozen, but 1 parameters require grad"):
        run(folders, tmp_path / "run")
