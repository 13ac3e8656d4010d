"""Decoder adapters on tiny, seeded Sana / SD1.5 folders written in the real diffusers layout (CPU, fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from metaqueries_core.decoders import DECODERS, DecoderAdapter, SanaAdapter, SD15Adapter, detect_family, load_decoder
from metaqueries_core.decoders.tiny import write_sd15_single_file, write_tiny_sana, write_tiny_sd15

FAMILIES = ("sana", "sd15")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {
        # folder names deliberately mislead: detection must read class names, not paths
        "sana": write_tiny_sana(root / "sd15_lookalike"),
        "sd15": write_tiny_sd15(root / "sana_lookalike"),
        "sd15_v": write_tiny_sd15(root / "sd15_v", prediction_type="v_prediction"),
        "sana_p2": write_tiny_sana(root / "sana_p2", patch_size=2),
    }


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, DecoderAdapter]:
    return {name: load_decoder(path) for name, path in folders.items()}


def _cond(adapter: DecoderAdapter, b: int = 2, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, adapter.text_width, generator=torch.Generator().manual_seed(seed))  # (B, T, C)


def _latents(adapter: DecoderAdapter, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(adapter.latent_shape(2, h, w), generator=torch.Generator().manual_seed(seed))  # (B, c, h, w)


# ---- loading / detection --------------------------------------------------------------------------------------------
def test_family_detection_reads_class_names(folders: dict[str, Path], adapters: dict[str, DecoderAdapter]) -> None:
    assert detect_family(folders["sana"]) == "sana" and isinstance(adapters["sana"], SanaAdapter)
    assert detect_family(folders["sd15"]) == "sd15" and isinstance(adapters["sd15"], SD15Adapter)
    assert DECODERS == {"sana": SanaAdapter, "sd15": SD15Adapter}
    assert adapters["sana"].prediction_type == "flow" and adapters["sd15"].prediction_type == "epsilon"
    assert adapters["sd15_v"].prediction_type == "v_prediction"
    assert (adapters["sana"].text_width, adapters["sd15"].text_width) == (64, 32)


def test_family_detection_from_model_index_only(folders: dict[str, Path], tmp_path: Path) -> None:
    for family in FAMILIES:
        only_index = tmp_path / family
        only_index.mkdir()
        shutil.copy(folders[family] / "model_index.json", only_index / "model_index.json")
        assert detect_family(only_index) == family


def test_not_a_decoder_folder_names_folder_and_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a supported diffusers decoder folder") as err:
        load_decoder(tmp_path)
    assert str(tmp_path) in str(err.value) and "transformer/config.json" in str(err.value)
    assert "unet/config.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_decoder(tmp_path / "missing")


def test_unknown_family_lists_supported(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"unknown decoder family 'flux'; supported: sana, sd15"):
        load_decoder(folders["sana"], family="flux")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load_decoder(folders["sana"], family="sd15")


def test_prediction_type_override_and_validation(folders: dict[str, Path]) -> None:
    assert load_decoder(folders["sd15"], prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction"):
        load_decoder(folders["sd15"], prediction_type="sample")


def test_position_embeddings_are_optional(tmp_path: Path) -> None:
    """Released Sana has no position embedding; the toy decoder turns sin-cos ones on (read back from the folder)."""
    plain = load_decoder(write_tiny_sana(tmp_path / "plain", sample_size=8, pixel_space=True))
    pe = load_decoder(write_tiny_sana(tmp_path / "pe", sample_size=8, pixel_space=True, interpolation_scale=1.0))
    assert plain.denoiser.patch_embed.pos_embed is None
    assert pe.denoiser.config.interpolation_scale == 1.0
    table = pe.denoiser.patch_embed.pos_embed  # (1, tokens, inner)
    assert table.shape[1] == 64 and table.std() > 0.1
    # same weights otherwise: the embedding alone changes the prediction, and differently per token position
    latents, t, cond = torch.zeros(1, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, plain.text_width)
    with torch.no_grad():
        diff = pe.predict(latents, t, cond) - plain.predict(latents, t, cond)  # (1, 3, 8, 8)
    assert diff.abs().max() > 1e-4 and diff[0, 0].std() > 1e-5


def test_tiny_folders_are_reproducible(tmp_path: Path, adapters: dict[str, DecoderAdapter]) -> None:
    again = load_decoder(write_tiny_sana(tmp_path / "again"))
    ref = adapters["sana"].denoiser.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.denoiser.state_dict().items())


def test_variant_only_weights_are_found(folders: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(folders["sana"], tmp_path / "bf16")
    for sub in ("transformer", "vae"):
        (copy / sub / "diffusion_pytorch_model.safetensors").rename(
            copy / sub / "diffusion_pytorch_model.bf16.safetensors"
        )
    assert isinstance(load_decoder(copy), SanaAdapter)


def test_of_several_variants_the_half_precision_inference_weights_load(folders: dict[str, Path], tmp_path: Path):
    """The Hub's SD1.5 folder ships fp16 and non_ema (training) weights; with only those, fp16 is loaded."""
    copy = shutil.copytree(folders["sd15"], tmp_path / "variants")
    unet = copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    state = {k: torch.zeros_like(v) for k, v in load_file(unet / "diffusion_pytorch_model.fp16.safetensors").items()}
    save_file(state, unet / "diffusion_pytorch_model.non_ema.safetensors")  # the other variant: all zeros
    loaded = load_decoder(copy).denoiser.state_dict()
    assert any(v.abs().sum() > 0 for v in loaded.values())  # not the zero non_ema weights
    (unet / "diffusion_pytorch_model.fp16.safetensors").rename(unet / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(ValueError, match=r"several variants \['ema', 'non_ema'\] and none of \['fp16', 'bf16'\]"):
        load_decoder(copy)


def test_sd15_single_file_round_trip(
    folders: dict[str, Path], adapters: dict[str, DecoderAdapter], tmp_path: Path
) -> None:
    ckpt = write_sd15_single_file(tmp_path / "tiny_sd15.safetensors", folder=folders["sd15"])
    loaded = load_decoder(ckpt, config=folders["sd15"])
    assert isinstance(loaded, SD15Adapter)
    for mine, ref in ((loaded.denoiser, adapters["sd15"].denoiser), (loaded.vae, adapters["sd15"].vae)):
        ref_sd = ref.state_dict()
        assert all(torch.equal(v, ref_sd[k]) for k, v in mine.state_dict().items())
    with pytest.raises(ValueError, match="config="):
        load_decoder(ckpt)


# ---- sizes, VAE -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape_non_square(adapters: dict[str, DecoderAdapter], family: str) -> None:
    assert adapters[family].latent_shape(2, 32, 48) == (2, 4, 16, 24)
    assert adapters[family].latent_shape(1, 48, 32) == (1, 4, 24, 16)


@pytest.mark.parametrize(
    ("name", "multiple", "nearest"), [("sana", 2, "32x48 or 34x48"), ("sana_p2", 4, "32x48 or 36x48")]
)
def test_invalid_size_names_the_multiple(
    adapters: dict[str, DecoderAdapter], name: str, multiple: int, nearest: str
) -> None:
    with pytest.raises(ValueError, match=f"multiples of {multiple}") as err:
        adapters[name].latent_shape(1, 33, 48)
    assert nearest in str(err.value)
    assert adapters[name].latent_shape(1, 4 * multiple, 6 * multiple) == (1, 4, 4 * multiple // 2, 6 * multiple // 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_shapes_and_range(adapters: dict[str, DecoderAdapter], family: str) -> None:
    adapter = adapters[family]
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W)
    latents = adapter.encode(images)  # (B, c, h, w)
    assert latents.shape == adapter.latent_shape(2, 32, 48) and latents.dtype == torch.float32
    assert torch.equal(latents, adapter.encode(images))  # deterministic (latent mean for the KL VAE)
    decoded = adapter.decode(latents)  # (B, 3, H, W)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        adapter.encode(images[:, :1])


# ---- denoiser -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_shape_and_mask(adapters: dict[str, DecoderAdapter], family: str) -> None:
    adapter = adapters[family]
    latents, cond = _latents(adapter), _cond(adapter)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0  # (B, T)
    with torch.no_grad():
        out = adapter.predict(latents, torch.tensor([500.0, 20.0]), cond, mask)  # (B, c, h, w)
        changed = cond.clone()
        changed[0, 3:] = 7.0  # only masked-out tokens change
        again = adapter.predict(latents, torch.tensor([500.0, 20.0]), changed, mask)
        scalar_t = adapter.predict(latents, torch.tensor(500.0), cond, None)
    assert out.shape == latents.shape and scalar_t.shape == latents.shape
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("family", FAMILIES)
def test_cond_width_mismatch_names_both_widths(adapters: dict[str, DecoderAdapter], family: str) -> None:
    adapter = adapters[family]
    bad = torch.randn(2, 5, adapter.text_width + 3)
    with pytest.raises(ValueError, match=f"cond width {adapter.text_width + 3} .* width {adapter.text_width}"):
        adapter.predict(_latents(adapter), torch.tensor([1.0, 2.0]), bad, None)


def test_flow_training_inputs(adapters: dict[str, DecoderAdapter]) -> None:
    adapter = adapters["sana"]
    x0, noise = _latents(adapter, seed=2), _latents(adapter, seed=3)
    x_t, t, target = adapter.training_inputs(x0, noise, torch.tensor([0.0, 1.0 - 1e-7]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(t, torch.tensor([0.0, 1000.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(target, noise - x0)
    x_mid, t_mid, _ = adapter.training_inputs(x0, noise, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(x_mid[1], 0.5 * x0[1] + 0.5 * noise[1])
    torch.testing.assert_close(t_mid, torch.tensor([250.0, 500.0]))


@pytest.mark.parametrize("name", ["sd15", "sd15_v"])
def test_ddpm_training_inputs(adapters: dict[str, DecoderAdapter], folders: dict[str, Path], name: str) -> None:
    adapter = adapters[name]
    x0, noise = _latents(adapter, seed=4), _latents(adapter, seed=5)
    x_t, t, target = adapter.training_inputs(x0, noise, torch.tensor([0.0, 0.9995]))
    assert t.tolist() == [0, 999]
    ddpm = DDPMScheduler.from_pretrained(folders[name], subfolder="scheduler")
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, noise, t))
    expected = noise if adapter.prediction_type == "epsilon" else ddpm.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected)
    with torch.no_grad():
        assert adapter.predict(x_t, t, _cond(adapter), None).shape == x0.shape


# ---- schedulers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "name"),
    [("sana", n) for n in SanaAdapter.scheduler_names] + [("sd15", n) for n in SD15Adapter.scheduler_names],
)
def test_scheduler_two_step_loop(adapters: dict[str, DecoderAdapter], family: str, name: str) -> None:
    adapter = adapters[family]
    sched = adapter.make_scheduler(name)
    sched.set_timesteps(2)
    assert len(sched.timesteps) == 2 and float(sched.timesteps.max()) <= adapter.num_train_timesteps
    cond = _cond(adapter)
    latents = _latents(adapter) * sched.init_noise_sigma  # (B, c, h, w)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)  # (B, c, h, w)
            out = adapter.predict(x, t.expand(2), cond, None)
            latents = sched.step(out, t, latents, return_dict=False)[0]
    assert latents.shape == adapter.latent_shape(2, 32, 48) and torch.isfinite(latents).all()
    assert adapter.make_scheduler(name) is not sched  # fresh every time


def test_sana_schedulers_use_flow_sigmas_and_folder_shift(folders: dict[str, Path]) -> None:
    adapter = load_decoder(folders["sana"])
    dpm = adapter.make_scheduler()
    assert dpm.config.prediction_type == "flow_prediction" and dpm.config.use_flow_sigmas
    assert dpm.config.flow_shift == 3.0 and adapter.make_scheduler("euler").config.shift == 3.0
    assert load_decoder(folders["sana"], flow_shift=1.5).make_scheduler("unipc").config.flow_shift == 1.5


def test_scheduler_errors_list_allowed(adapters: dict[str, DecoderAdapter]) -> None:
    with pytest.raises(ValueError, match=r"'ddim' is not available.*allowed: dpmpp_2m, euler, unipc"):
        adapters["sana"].make_scheduler("ddim")
    with pytest.raises(ValueError, match=r"unknown scheduler 'lms'.*allowed: dpmpp_2m, euler, ddim, unipc"):
        adapters["sd15"].make_scheduler("lms")


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_denoiser_not_vae(folders: dict[str, Path], family: str) -> None:
    adapter = load_decoder(folders[family])  # a private copy: this test writes .grad
    x0, noise = _latents(adapter, seed=6), _latents(adapter, seed=7)
    x_t, t, target = adapter.training_inputs(x0, noise, torch.tensor([0.3, 0.7]))
    F.mse_loss(adapter.predict(x_t, t, _cond(adapter), torch.ones(2, 5)), target).backward()
    assert adapter.trainable_modules() == {"denoiser": adapter.denoiser}
    params = adapter.trainable_parameters()
    assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not p.requires_grad and p.grad is None for p in adapter.vae.parameters())
    adapter.set_denoiser_trainable(False)
    assert adapter.trainable_parameters() == [] and not adapter.denoiser.training


# ---- denoised estimates (sampling previews) ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sana", "sd15", "sd15_v"])
def test_denoised_inverts_the_training_inputs(adapters: dict[str, DecoderAdapter], name: str) -> None:
    """Given the exact target as the model output, the estimate is the clean latents, at every noise level."""
    adapter = adapters[name]
    x0, noise = _latents(adapter, seed=6), _latents(adapter, seed=7)
    x_t, t, target = adapter.training_inputs(x0, noise, torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(adapter.denoised(x_t, target, t), x0, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapter.denoised(x_t, 0.5 * target, t), x0, atol=1e-2)


def test_denoised_at_euler_fractional_timesteps(adapters: dict[str, DecoderAdapter]) -> None:
    """Euler steps at fractional timesteps (with linspace spacing) on sigma-scaled latents; the estimate from its
    scaled model input and the true noise is the clean latents."""
    adapter = adapters["sd15"]
    euler = adapter.make_scheduler("euler")
    sched = type(euler).from_config(euler.config, timestep_spacing="linspace")  # SD1.5's own "leading" is integer
    sched.set_timesteps(7)
    x0, noise = _latents(adapter, seed=8), _latents(adapter, seed=9)
    assert any(float(t) != int(t) for t in sched.timesteps)
    for sigma, t in zip(sched.sigmas, sched.timesteps):
        sched._step_index = None  # scale_model_input looks the sigma up from t
        x_in = sched.scale_model_input(x0 + sigma * noise, t)  # (B, c, h, w)
        torch.testing.assert_close(adapter.denoised(x_in, noise, t), x0, atol=1e-4, rtol=1e-4)
