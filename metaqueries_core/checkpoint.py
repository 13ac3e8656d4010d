"""The MetaQuery checkpoint: one .safetensors file with tensors `queries` (and `queries.lead` for lead slots),
`connector.*` and optionally `decoder.*`, and a JSON config in its metadata (DESIGN.md section 3). Writes are atomic:
a temp file renamed into place.

Format versions: 1 as first written; 2 adds `prompt_suffix`, `prompt_template`, `empty_prompt`, `lead_slots` and the
connector's `out_norm_eps` and `final_norm` (defaults: what version 1 meant); 3 adds `image_crop` and 4
`min_image_tokens` (default None: what the earlier versions meant)."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .connector import ConnectorConfig
from .file_modes import apply_umask
from .head import HEAD_KEYS, MetaQueryHead
from .state_fit import misfit

FORMAT_VERSION = 4
METADATA_KEY = "metaqueries_config"
Stage = Literal["pretrain", "instruct"]


@dataclass(frozen=True)
class MetaQueryConfig:
    mllm_family: str  # the MLLM's config.model_type
    mllm_width: int
    num_queries: int
    connector: ConnectorConfig
    decoder_family: str  # "sana" | "sd15"
    decoder_text_width: int
    stage: Stage = "pretrain"
    system_prompt: str | None = None
    max_prompt_tokens: int = 256
    prompt_suffix: str = ""  # text between the generation prompt and the slots
    prompt_template: str = ""  # a whole prompt with "{caption}" instead of the chat template (mllm.PromptLayout)
    empty_prompt: str | None = None  # with a template: the prompt of an empty caption
    lead_slots: int = 0  # learned slots before the queries, not read out (`queries.lead`)
    image_crop: int | None = None  # input images scaled and centre-cropped to this square first (None: as they are)
    min_image_tokens: int | None = None  # Qwen-VL: smaller input images scaled up to this many tokens
    mllm_name: str = ""  # a hint for users (folder name), never used to pick code
    decoder_name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MetaQueryConfig:
        """The config a checkpoint's metadata holds; ValueError naming what is wrong (a newer format first: its new
        keys are not typos)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint config is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint config is a JSON {type(data).__name__}, not an object")
        version = data.get("format_version", 0)
        if not isinstance(version, int):
            raise ValueError(f"checkpoint format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {version!r} is newer than this code's {FORMAT_VERSION}; "
                "update ComfyUI-MetaQueries"
            )
        data = {**data, "connector": ConnectorConfig(**_known_keys(ConnectorConfig, data.get("connector")))}
        return cls(**_known_keys(cls, data))

    def head_settings(self) -> dict:
        """`MetaQueryHead(**config.head_settings())`: the head this checkpoint holds, untrained."""
        return {key: getattr(self, key) for key in HEAD_KEYS}


def _known_keys(cls: type, data: Any) -> dict:
    """`data` checked against dataclass `cls`: an object holding every required field and no unknown one."""
    what = "checkpoint config" if cls is MetaQueryConfig else f"checkpoint config's {cls.__name__}"
    if not isinstance(data, dict):
        raise ValueError(f"{what} is missing or not an object: {data!r}")
    allowed = {f.name for f in fields(cls)}
    if unknown := sorted(set(data) - allowed):
        raise ValueError(f"{what} has unknown keys {unknown}; known: {sorted(allowed)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    if missing := [k for k in required if k not in data]:
        raise ValueError(f"{what} lacks the required keys {missing}")
    return data


def save_checkpoint(
    path: str | Path,
    head: MetaQueryHead,
    config: MetaQueryConfig,
    decoder_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write queries + connector (+ decoder weights when trained) atomically."""
    ours, theirs = (
        {**head.settings(), "mllm_width": head.queries.width},
        {**config.head_settings(), "mllm_width": config.mllm_width},
    )
    if differences := [f"{k} {ours[k]!r} (config {theirs[k]!r})" for k in ours if ours[k] != theirs[k]]:
        raise ValueError(f"the head is not the one its config describes: head has {'; '.join(differences)}")
    tensors = {"queries": head.queries.queries.detach()}
    if head.queries.lead is not None:
        tensors["queries.lead"] = head.queries.lead.detach()
    tensors.update({f"connector.{k}": v.detach() for k, v in head.connector.state_dict().items()})
    for k, v in (decoder_state or {}).items():
        tensors[f"decoder.{k}"] = v.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: config.to_json(), "format": "pt"})
        apply_umask(tmp)  # save_file makes it owner-only; a ComfyUI running as another user must read it
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_config(path: str | Path) -> MetaQueryConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MetaQuery checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(
            f"{str(path)!r} is not a readable .safetensors file ({e}); expected a MetaQuery checkpoint"
        ) from e
    if METADATA_KEY not in metadata:
        raise ValueError(f"{str(path)!r} is not a MetaQuery checkpoint: its metadata has no {METADATA_KEY!r}")
    try:
        return MetaQueryConfig.from_json(metadata[METADATA_KEY])
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from e


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[MetaQueryConfig, MetaQueryHead, dict[str, torch.Tensor]]:
    """-> (config, head with weights loaded on `device`, decoder state dict (empty when the decoder was frozen)).

    Everything is read on the CPU into memory of its own (not views of the file); the decoder weights stay there
    until `apply_decoder_state` copies them into a decoder, so they never take a second copy's room on a GPU."""
    config = read_config(path)
    state, decoder_state = {}, {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensor = f.get_tensor(key).clone()
            if key.startswith("decoder."):
                decoder_state[key[len("decoder.") :]] = tensor
            else:
                state["queries.queries" if key == "queries" else key] = tensor.to(dtype)
    try:
        head = MetaQueryHead.from_state(config.head_settings(), state)
    except ValueError as e:
        raise ValueError(f"{str(path)!r} does not match its own config: {e}") from e
    return config, head.to(device), decoder_state


def check_compatible(config: MetaQueryConfig, *, mllm: Any | None = None, decoder: Any | None = None) -> None:
    """Raise naming every mismatch between a checkpoint's config and the loaded MLLM adapter / decoder adapter."""
    problems = []
    if mllm is not None:
        family = mllm.family
        if family != config.mllm_family:
            problems.append(f"MLLM family: checkpoint {config.mllm_family!r}, loaded {family!r}")
        if mllm.width != config.mllm_width:
            problems.append(f"MLLM width: checkpoint {config.mllm_width}, loaded MLLM {mllm.width}")
    if decoder is not None:
        if decoder.family != config.decoder_family:
            problems.append(f"decoder family: checkpoint {config.decoder_family!r}, loaded {decoder.family!r}")
        if decoder.text_width != config.decoder_text_width:
            problems.append(
                f"decoder text width: checkpoint {config.decoder_text_width}, loaded decoder {decoder.text_width}"
            )
    if problems:
        raise ValueError("MetaQuery checkpoint does not match the loaded models: " + "; ".join(problems))


def apply_decoder_state(decoder: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's `decoder.*` weights (keys of the denoiser's state dict) into the decoder's denoiser, naming
    what does not fit; on a misfit the denoiser is left as it was."""
    if problems := misfit(decoder.denoiser, state):
        raise ValueError(f"the checkpoint's decoder weights do not fit this {decoder.family} denoiser: {problems}")
    decoder.denoiser.load_state_dict(state)


def config_for(head: MetaQueryHead, *, mllm: Any, decoder: Any, stage: Stage = "pretrain") -> MetaQueryConfig:
    """The checkpoint config describing `head` trained between this MLLM adapter and this decoder adapter."""
    return MetaQueryConfig(
        mllm_family=mllm.family,
        mllm_width=mllm.width,
        decoder_family=decoder.family,
        decoder_text_width=decoder.text_width,
        stage=stage,
        **head.settings(),
        mllm_name=Path(mllm.name).name,
        decoder_name=Path(getattr(decoder, "name", "") or "").name,
    )
