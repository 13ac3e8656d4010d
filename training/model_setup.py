"""Build what a run trains: load the frozen MLLM and the decoder, make or load the head, set what trains."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open

from metaqueries_core.checkpoint import MetaQueryConfig, apply_decoder_state, check_compatible, load_checkpoint
from metaqueries_core.connector import ConnectorConfig
from metaqueries_core.decoders import DecoderAdapter, load_decoder
from metaqueries_core.decoders.sana import SanaAdapter
from metaqueries_core.head import HEAD_KEYS, MetaQueryHead
from metaqueries_core.mllm import MLLMAdapter, load_mllm

from .config import ModelSection

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections of Sana blocks and SD UNet blocks
LORA_SCALING = 1.0  # lora_alpha / r, see set_decoder_mode


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_models(cfg: ModelSection, device: torch.device) -> tuple[MLLMAdapter, DecoderAdapter]:
    for key in ("mllm", "decoder"):
        if not getattr(cfg, key):
            raise ValueError(f"model.{key} is empty: give the local folder of the {key.upper()} to train with")
    mllm = load_mllm(cfg.mllm, dtype=_dtype(cfg.mllm_dtype, device), device=device)
    decoder = load_run_decoder(cfg, device)
    trainable = [n for n, p in mllm.model.named_parameters() if p.requires_grad]
    if trainable:  # the method's premise: the MLLM's understanding is untouched
        raise RuntimeError(f"the MLLM must be frozen, but {len(trainable)} parameters require grad: {trainable[:3]}")
    return mllm, decoder


def load_run_decoder(cfg: ModelSection, device: torch.device) -> DecoderAdapter:
    """The decoder folder as a run trains it: fp32 weights (autocast gives bf16 compute on GPUs), `train_shift`."""
    decoder = load_decoder(cfg.decoder, dtype=torch.float32, device=device)
    if cfg.train_shift != 1.0:
        if not isinstance(decoder, SanaAdapter):
            raise ValueError(
                f"model.train_shift={cfg.train_shift} is for flow-matching decoders (sana); {cfg.decoder} is a "
                f"{decoder.family} decoder: leave model.train_shift at 1.0"
            )
        decoder.train_shift = cfg.train_shift
    return decoder


def build_head(cfg: ModelSection, mllm: MLLMAdapter, decoder: DecoderAdapter) -> MetaQueryHead:
    """A fresh head, or the one in `init_checkpoint` (checked against the loaded models and against the head this
    config describes; its decoder weights are applied to the decoder)."""
    if cfg.min_image_tokens is not None and not mllm.scales_images:
        raise ValueError(
            f"model.min_image_tokens is set, but MLLM {cfg.mllm!r} ({mllm.family}) gives every image fixed tiles; it "
            "applies to Qwen2-VL and Qwen2.5-VL: drop it"
        )
    connector = connector_config(cfg, mllm, decoder)
    if cfg.init_checkpoint:
        config, head, decoder_state = load_checkpoint(cfg.init_checkpoint)
        check_compatible(config, mllm=mllm, decoder=decoder)
        tensors = {**head.state_dict(), **{f"decoder.{k}": v for k, v in decoder_state.items()}}
        if bad := [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
            raise ValueError(
                f"model.init_checkpoint {cfg.init_checkpoint!r} holds inf / NaN values in {bad[:5]}: it was saved from "
                "a diverged run; start from an earlier export"
            )
        if differences := head_differences(cfg, connector, config):
            raise ValueError(
                f"model.init_checkpoint {cfg.init_checkpoint!r} holds a different head than this config describes: "
                f"{'; '.join(differences)}. The head is loaded as it was trained: set these keys to the checkpoint's "
                "values (or drop init_checkpoint to train a new head)"
            )
        if decoder_state:
            apply_decoder_state(decoder, decoder_state)  # strict; names the keys that do not fit
        log.info("initialised from %s (stage %s)", cfg.init_checkpoint, config.stage)
        return head.to(mllm.device)
    head = MetaQueryHead(connector=connector, **{key: getattr(cfg, key) for key in HEAD_KEYS if key != "connector"})
    if cfg.queries_init_text is not None:
        init_queries_from_text(head, mllm, cfg.queries_init_text)
    return head.to(mllm.device)


def connector_config(cfg: ModelSection, mllm: MLLMAdapter, decoder: DecoderAdapter) -> ConnectorConfig:
    """The connector `cfg.connector` describes between these models (the decoder picks the default out-norm scale)."""
    c = cfg.connector
    scale = c.out_norm_scale
    if scale is None:
        scale = math.sqrt(5.5) if decoder.family == "sana" else 1.0
    return ConnectorConfig(
        in_width=mllm.width,
        out_width=decoder.text_width,
        width=c.width,
        depth=c.depth,
        heads=c.heads,
        mlp_ratio=c.mlp_ratio,
        layer_style=c.layer_style,
        pos_embed=c.pos_embed,
        qk_norm=c.qk_norm,
        final_norm=c.final_norm,
        projection=c.projection,
        out_norm_scale=scale,
        out_norm_eps=c.out_norm_eps,
        init_std=c.init_std,
        num_slots=cfg.num_queries if c.slot_embed else 0,
    )


def head_differences(cfg: ModelSection, connector: ConnectorConfig, loaded: MetaQueryConfig) -> list[str]:
    """'key ours (checkpoint theirs)' for each setting of the head that the checkpoint fixes and the config sets
    otherwise. Initialisation-only settings (queries_init_text, connector out_norm_scale and init_std) do not count:
    the trained weights replace what they set. Widths and head counts compare as resolved (null = the default)."""
    theirs = loaded.connector
    pairs = {
        **{f"model.{key}": (getattr(cfg, key), getattr(loaded, key)) for key in HEAD_KEYS if key != "connector"},
        "model.connector.width": (connector.inner_width, theirs.inner_width),
        "model.connector.heads": (connector.num_heads, theirs.num_heads),
        "model.connector.slot_embed": (connector.num_slots > 0, theirs.num_slots > 0),
        **{
            f"model.connector.{name}": (getattr(connector, name), getattr(theirs, name))
            for name in (
                "depth",
                "mlp_ratio",
                "layer_style",
                "pos_embed",
                "qk_norm",
                "final_norm",
                "projection",
                "out_norm_eps",
            )
        },
    }
    return [f"{key} {ours!r} (checkpoint {ckpt!r})" for key, (ours, ckpt) in pairs.items() if ours != ckpt]


@torch.no_grad()
def init_queries_from_text(head: MetaQueryHead, mllm: MLLMAdapter, text: str) -> None:
    """Set the queries to the MLLM's input embeddings of `text`'s tokens, repeated to the number of queries."""
    ids = mllm.caption_ids(text)
    if not ids:
        raise ValueError(f"model.queries_init_text {text!r} has no tokens; give a non-empty text or null")
    ids = (ids * head.num_queries)[: head.num_queries]
    emb = mllm.language_model.get_input_embeddings().weight[torch.tensor(ids, device=mllm.device)]  # (N, D)
    head.queries.queries.copy_(emb.float().to(head.queries.queries.device))


def set_decoder_mode(decoder: DecoderAdapter, mode: str, lora_rank: int) -> None:
    """frozen: nothing of the decoder trains; full: the whole denoiser; lora: low-rank adapters on its attention
    projections (peft), everything else of the denoiser frozen. The VAE never trains."""
    if mode == "frozen":
        decoder.denoiser.requires_grad_(False)
    elif mode == "full":
        decoder.denoiser.requires_grad_(True)
    elif mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("model.decoder_mode=lora needs peft: pip install 'comfyui-metaqueries[lora]'") from e
        decoder.denoiser.requires_grad_(False)
        # alpha = rank: the update B A enters at scale alpha / rank = 1 whatever the rank (merge_lora_state relies on it)
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS)
        # the PeftModel forwards attribute reads (`.config`, `.dtype`) to the wrapped denoiser, so the adapter's
        # predict() works unchanged; only its parameters are named differently (base_layer / lora_A / lora_B)
        decoder.denoiser = get_peft_model(decoder.denoiser, config)
    else:
        raise ValueError(f"model.decoder_mode {mode!r} not in ['frozen', 'full', 'lora']")
    decoder.denoiser.train(mode != "frozen")


def count_trainable(mllm: MLLMAdapter, head: MetaQueryHead, decoder: DecoderAdapter) -> dict[str, int]:
    """Trainable parameter counts per role; raises if any MLLM parameter would train (the method's premise)."""
    counts = {
        "mllm": sum(p.numel() for p in mllm.model.parameters() if p.requires_grad),
        "queries": sum(p.numel() for p in head.queries.parameters() if p.requires_grad),
        "connector": sum(p.numel() for p in head.connector.parameters() if p.requires_grad),
        "decoder": sum(p.numel() for p in decoder.denoiser.parameters() if p.requires_grad),
        "vae": sum(p.numel() for p in decoder.vae.parameters() if p.requires_grad),
    }
    if counts["mllm"] or counts["vae"]:
        names = [n for n, p in mllm.model.named_parameters() if p.requires_grad][:3]
        raise RuntimeError(
            f"the MLLM and the VAE must be frozen, but {counts['mllm']} MLLM parameter values ({names}...) and "
            f"{counts['vae']} VAE values require grad"
        )
    return counts


def checkpoint_has_decoder(path: str | Path) -> bool:
    """Whether a MetaQuery checkpoint carries decoder weights (`decoder.*` tensors)."""
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("decoder.") for k in f.keys())


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict -> the plain denoiser's, each adapted weight W replaced by W + scaling * B A.

    Works on a (gathered) state dict rather than on the module, so it is the same under DDP, FSDP and DeepSpeed,
    and the trained model is neither copied nor merged in place."""
    prefix = "base_model.model."
    plain = {}
    for key, value in state.items():
        if "lora_" not in key:
            plain[key.removeprefix(prefix).replace(".base_layer.", ".")] = value
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(prefix).split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        w = plain[f"{module}.weight"]  # (out, in)
        plain[f"{module}.weight"] = w + (scaling * (b.float() @ a.float())).to(w.dtype)  # (out, r) @ (r, in)
    return plain


def decoder_export_state(
    state: dict[str, torch.Tensor], mode: str, *, carried: bool = False
) -> dict[str, torch.Tensor] | None:
    """Decoder weights for the node checkpoint from the denoiser's state dict: merged full weights for LoRA, the
    weights themselves for `full`, and none for a frozen decoder unless `carried` (the init checkpoint brought
    trained decoder weights, which must travel on into this export or the stage would fall back to the base one)."""
    if mode == "frozen" and not carried:
        return None
    if mode == "lora":
        state = merge_lora_state(state, LORA_SCALING)
    return {k: v.detach().cpu() for k, v in state.items()}
