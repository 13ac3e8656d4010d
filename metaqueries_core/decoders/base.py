"""The decoder adapter interface: denoiser + frozen VAE + scheduler config behind one API.

An adapter feeds connector conditioning ``cond (B, T, C)`` / ``mask (B, T)`` to the denoiser's cross-attention, maps
images to latents and back, builds training inputs/targets and makes sampling schedulers. Local folders only."""

from __future__ import annotations

import abc
import inspect
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from ..memory import cpu_bytes

PathLike = str | os.PathLike

log = logging.getLogger(__name__)

# Every scheduler name any family knows; a family may support a subset (see DecoderAdapter.scheduler_names).
SCHEDULER_NAMES: tuple[str, ...] = ("dpmpp_2m", "euler", "ddim", "unipc")

_PLAIN_WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_VARIANT_WEIGHTS = re.compile(
    r"^diffusion_pytorch_model\.(?:(\w+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)|(?:safetensors|bin)\.index\.(\w+)\.json)$"
)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


# Among several variants and no plain weights, the inference (EMA) weights in half precision, as the Hub's SD1.5
# folder ships them next to `non_ema` (the training weights)
PREFERRED_VARIANTS = ("fp16", "bf16")


def detect_variant(folder: Path) -> str | None:
    """The weights variant (e.g. ``"bf16"``) of a model folder that holds only variant weights, else None; of several,
    the first of ``PREFERRED_VARIANTS`` there (logged)."""
    names = [p.name for p in folder.iterdir()]
    if any(_PLAIN_WEIGHTS.match(n) for n in names):
        return None
    variants = sorted({m.group(1) or m.group(2) for n in names if (m := _VARIANT_WEIGHTS.match(n))})
    if len(variants) > 1:
        chosen = next((v for v in PREFERRED_VARIANTS if v in variants), None)
        if chosen is None:
            raise ValueError(
                f"{folder} holds weights of several variants {variants} and none of {list(PREFERRED_VARIANTS)}; "
                "pass variant= to load_decoder, or keep only the variant to use in the folder"
            )
        log.info("%s holds weights of the variants %s: loading %r", folder, variants, chosen)
        return chosen
    return variants[0] if variants else None


def check_model_folder(path: PathLike, *, family: str, denoiser_subfolder: str) -> Path:
    """``path`` as a resolved folder that has ``denoiser_subfolder/`` and ``vae/``; raises naming what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{family} decoder folder {folder} does not exist or is not a folder")
    # a pixel-space model declares "vae": [null, null] in model_index.json and has no vae/ folder
    pixel_space = (read_json(folder / "model_index.json") or {}).get("vae") == [None, None]
    needed = (denoiser_subfolder,) if pixel_space else (denoiser_subfolder, "vae")
    missing = [name for name in needed if not (folder / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a {family} diffusers folder: missing {', '.join(f'{m}/config.json' for m in missing)} "
            f"(expected {denoiser_subfolder}/, vae/ and optionally scheduler/)"
        )
    return folder.resolve()


def load_component(model_cls: type, folder: Path, subfolder: str, *, dtype: torch.dtype, variant: str | None) -> Any:
    """Load one diffusers model from ``folder/subfolder`` strictly from local files."""
    sub = folder / subfolder
    config = read_json(sub / "config.json")
    if config is None:
        raise FileNotFoundError(f"{sub} has no config.json; expected a diffusers {model_cls.__name__} folder")
    found = config.get("_class_name")
    if found is not None and found != model_cls.__name__:
        raise ValueError(f"{sub}/config.json describes a {found}, expected {model_cls.__name__}")
    variant = variant if variant is not None else detect_variant(sub)
    return model_cls.from_pretrained(
        folder, subfolder=subfolder, torch_dtype=dtype, variant=variant, local_files_only=True
    )


def nearest_multiples(value: int, multiple: int) -> tuple[int, int]:
    """The closest multiples of ``multiple`` at or below / at or above ``value`` (never below ``multiple``)."""
    low = max(multiple, (value // multiple) * multiple)
    high = max(multiple, -(-value // multiple) * multiple)
    return low, high


def scheduler_from_config(cls: type[SchedulerMixin], config: dict[str, Any], **overrides: Any) -> SchedulerMixin:
    """``cls.from_config`` with only the keys ``cls`` accepts (configs of other scheduler classes carry extra keys)."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kept = {k: v for k, v in {**config, **overrides}.items() if k in accepted}
    return cls.from_config(kept)


class DecoderAdapter(abc.ABC):
    """A frozen-VAE diffusion decoder that takes connector conditioning ``cond (B, T, C)`` + ``mask (B, T)``."""

    family: ClassVar[str]
    denoiser_subfolder: ClassVar[str]
    scheduler_names: ClassVar[tuple[str, ...]]
    unavailable_reason: ClassVar[str] = "the {family} decoder does not support it"

    prediction_type: str
    text_width: int
    denoiser: nn.Module
    vae: nn.Module
    latent_channels: int
    spatial_factor: int

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        vae: nn.Module,
        scheduler_config: dict[str, Any],
        prediction_type: str,
        text_width: int,
        latent_channels: int,
        spatial_factor: int,
        source: Path | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.vae = vae
        self.scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.prediction_type = prediction_type
        self.text_width = int(text_width)
        self.latent_channels = int(latent_channels)
        self.spatial_factor = int(spatial_factor)
        self.source = source
        self.weights_from = ""  # the MetaQuery checkpoint whose fine-tuned weights the denoiser holds ("": none)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.vae.requires_grad_(False)
        self.vae.eval()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_folder(
        cls, path: PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **options: Any
    ) -> DecoderAdapter:
        """Load from a local diffusers folder with ``transformer|unet/``, ``vae/`` and optionally ``scheduler/``."""

    # ---- placement ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def get_ram_usage(self) -> int:
        """Host memory the denoiser's and the VAE's weights hold (ComfyUI's RAM cache weighs cached outputs by it)."""
        return cpu_bytes((self.denoiser, self.vae))

    def to(self, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DecoderAdapter:
        """Move denoiser and VAE together; returns self."""
        kwargs: dict[str, Any] = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.denoiser.to(**kwargs)
            self.vae.to(**kwargs)
        return self

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.spatial_factor

    def _size_explanation(self) -> str:
        return f"the VAE downsampling factor {self.spatial_factor}"

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(B, latent_channels, height // f, width // f)`` for an image size; raises for sizes the model can't take."""
        m = self.size_multiple
        if batch < 1 or height < 1 or width < 1:
            raise ValueError(f"batch, height and width must be positive, got batch={batch}, {height}x{width}")
        if height % m or width % m:
            (h_lo, h_hi), (w_lo, w_hi) = nearest_multiples(height, m), nearest_multiples(width, m)
            nearest = list(dict.fromkeys((f"{h_lo}x{w_lo}", f"{h_hi}x{w_hi}")))  # one when both round to the same
            raise ValueError(
                f"image size {height}x{width} (height x width) is not allowed for the {self.family} decoder: both sides "
                f"must be multiples of {m} ({self._size_explanation()}); nearest valid "
                f"{'size' if len(nearest) == 1 else 'sizes'}: {' or '.join(nearest)}"
            )
        f = self.spatial_factor
        return batch, self.latent_channels, height // f, width // f

    # ---- VAE ----------------------------------------------------------------------------------------------------
    def _vae_shift_scale(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None)
        scale = getattr(self.vae.config, "scaling_factor", None)
        return float(shift or 0.0), float(1.0 if scale is None else scale)

    @abc.abstractmethod
    def _vae_encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Raw (unscaled) VAE latents of images in [-1, 1]."""

    def to_vae_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (what the denoiser sees) -> raw VAE latents (ComfyUI's LATENT convention)."""
        shift, scale = self._vae_shift_scale()
        return latents / scale + shift

    def from_vae_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> scaled latents."""
        shift, scale = self._vae_shift_scale()
        return (z - shift) * scale

    @torch.no_grad()
    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, latent_channels, H/f, W/f)`` (input dtype)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        f = self.spatial_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} must be a multiple of the VAE factor {f} on both sides")
        vae_param = next(self.vae.parameters())
        x = images.to(device=vae_param.device, dtype=vae_param.dtype)  # (B, 3, H, W)
        z = self._vae_encode(x, generator)  # (B, c, H/f, W/f)
        shift, scale = self._vae_shift_scale()
        return ((z - shift) * scale).to(images.dtype)  # (B, c, H/f, W/f)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, c, h, w)`` -> images ``(B, 3, h*f, w*f)`` in [0, 1] (clamped, latents' dtype).

        Differentiable w.r.t. the latents (the VAE itself stays frozen)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w) for this VAE, got shape {tuple(latents.shape)}"
            )
        shift, scale = self._vae_shift_scale()
        vae_param = next(self.vae.parameters())
        z = latents.to(device=vae_param.device, dtype=vae_param.dtype) / scale + shift  # (B, c, h, w)
        x = self.vae.decode(z, return_dict=False)[0]  # (B, 3, H, W) in ~[-1, 1]
        return ((x.to(latents.dtype) + 1.0) / 2.0).clamp(0.0, 1.0)  # (B, 3, H, W)

    # ---- denoiser -----------------------------------------------------------------------------------------------
    def _latent_multiple(self) -> int:
        return 1

    def _check_predict_inputs(
        self, latents: Tensor, timestep: Tensor, cond: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, h, w) for the {self.family} decoder, "
                f"got shape {tuple(latents.shape)}"
            )
        b, _, h, w = latents.shape
        lm = self._latent_multiple()
        if h % lm or w % lm:
            raise ValueError(f"latent size {h}x{w} must be a multiple of the patch size {lm} on both sides")
        if cond.ndim != 3:
            raise ValueError(f"cond must be (B, T, C), got shape {tuple(cond.shape)}")
        if cond.shape[-1] != self.text_width:
            raise ValueError(
                f"cond width {cond.shape[-1]} does not match the {self.family} decoder's cross-attention width "
                f"{self.text_width}; the connector's output width must be {self.text_width}"
            )
        if cond.shape[0] != b or (mask is not None and tuple(mask.shape) != tuple(cond.shape[:2])):
            got = f"cond {tuple(cond.shape)}, mask {None if mask is None else tuple(mask.shape)}"
            raise ValueError(f"cond must be ({b}, T, C) and mask (B, T) or None to match latents batch {b}; got {got}")
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)  # (B,)
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be a scalar or (B,) = ({b},), got shape {tuple(timestep.shape)}")
        return timestep, mask

    @abc.abstractmethod
    def _denoise(self, latents: Tensor, timestep: Tensor, cond: Tensor, mask: Tensor | None) -> Tensor:
        """Family-specific denoiser call on checked inputs."""

    def predict(self, latents: Tensor, timestep: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        """Model output (in ``prediction_type``) for latents ``(B, c, h, w)``, timestep ``(B,)`` in scheduler units
        (0..num_train_timesteps), cond ``(B, T, text_width)`` and mask ``(B, T)`` (1 = keep). Same shape/dtype as latents."""
        timestep, mask = self._check_predict_inputs(latents, timestep, cond, mask)
        dtype, device = self.dtype, self.device
        mask = None if mask is None else mask.to(device=device, dtype=dtype)  # (B, T)
        out = self._denoise(latents.to(device, dtype), timestep.to(device), cond.to(device, dtype), mask)
        return out.to(latents.dtype)  # (B, c, h, w)

    @abc.abstractmethod
    def denoised(self, x_t: Tensor, output: Tensor, timestep: Tensor) -> Tensor:
        """The clean latents ``x0`` that a model ``output`` implies at the model input ``x_t`` (both ``(B, c, h, w)``,
        ``x_t`` as `predict` gets it, after the scheduler's ``scale_model_input``) and ``timestep`` (a scalar or
        ``(B,)``, scheduler units, fractional allowed): what sampling previews show at each step."""

    @abc.abstractmethod
    def training_inputs(self, x0: Tensor, noise: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, timestep, target)`` for clean latents x0, noise (both ``(B, c, h, w)``) and u ``(B,)`` in [0, 1)."""

    # ---- schedulers ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _scheduler_factories(self) -> dict[str, Callable[[], SchedulerMixin]]:
        """Name -> builder for every scheduler this family supports."""

    def make_scheduler(self, name: str = "dpmpp_2m") -> SchedulerMixin:
        """A fresh sampling scheduler (from the folder's scheduler config when present)."""
        factories = self._scheduler_factories()
        if name not in factories:
            allowed = ", ".join(factories)
            if name in SCHEDULER_NAMES:
                why = self.unavailable_reason.format(name=name, family=self.family)
                raise ValueError(f"scheduler {name!r} is not available: {why}; allowed: {allowed}")
            raise ValueError(f"unknown scheduler {name!r} for the {self.family} decoder; allowed: {allowed}")
        return factories[name]()

    # ---- training -----------------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules a trainer may update: the denoiser only (the VAE is always frozen)."""
        return {"denoiser": self.denoiser}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The denoiser's parameters that currently require grad."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def set_denoiser_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the denoiser (and set train/eval mode); the VAE stays frozen."""
        self.denoiser.requires_grad_(trainable)
        self.denoiser.train(trainable)
        self.vae.requires_grad_(False)
        self.vae.eval()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, prediction_type={self.prediction_type!r}, "
            f"text_width={self.text_width}, latent_channels={self.latent_channels}, "
            f"spatial_factor={self.spatial_factor}, source={str(self.source) if self.source else None!r})"
        )
