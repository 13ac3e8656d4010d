"""Import a checkpoint of the MetaQuery reference trainer (facebookresearch/metaquery: the Hugging Face Trainer folder
of its `MetaQuery` model, `config.json` with `"model_type": "metaquery"`) into this pack's checkpoint format.

The reference saves the whole model; what trained, and where it goes:
- its connector `model.connector` (a Qwen2-style encoder, Linear, GELU, Linear, RMSNorm) -> `connector.*` with layer
  style "reference" (RoPE before a per-head qk-norm), no final encoder norm and output norm eps 1e-5;
- the MLLM's input embedding table, grown by N + 2 rows `<begin_of_img>`, `<end_of_img>`, `<img0>`..`<img{N-1}>` ->
  one lead slot (`<begin_of_img>`) and the N queries. Its prompt ends "\\n<begin_of_img><img0>...", so the prompt
  suffix is "\\n". Every other MLLM weight is the base model's: load that model's folder in Load MLLM;
- `model.transformer` (Sana, fully fine-tuned in its Sana recipes) -> `decoder.*`, unless it was frozen (SD1.5).

The MLLM family and the decoder family are read from the weights' structure, never from model ids.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import torch

from ..checkpoint import MetaQueryConfig, Stage
from ..connector import ConnectorConfig
from ..head import MetaQueryHead
from ..memory import own_module, own_tensors
from .output import DecoderChoice, build_head, check_request, importer_parser, run_import, write_imported
from .weights import WeightsFolder

log = logging.getLogger(__name__)

MODEL_TYPE = "metaquery"
# the square the reference scales and centre-crops input images to, per MLLM family (its models/model.py sets a
# Resize(384) + CenterCrop(384) for LLaVA-OneVision and nothing for Qwen2.5-VL)
REFERENCE_IMAGE_CROP = {"llava_onevision": 384}
# the fewest tokens the reference gives an input image, per family (its models/model.py loads the Qwen2.5-VL processor
# with min_pixels 256 * 28 * 28: 256 merged patches); LLaVA-OneVision's fixed tiles have no such setting
REFERENCE_MIN_IMAGE_TOKENS = {"qwen2_5_vl": 256, "qwen2_vl": 256}
CONNECTOR, BACKBONE, DECODER = "model.connector.", "model.mllm_backbone.", "model.transformer."
PROJECTION = {"1": "proj.0", "3": "proj.2", "4": "proj.3"}  # Linear, (GELU), Linear, RMSNorm
LAYER_RENAMES = (
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".norm1."),
    (".post_attention_layernorm.", ".norm2."),
    ("_norm.gamma", "_norm.weight"),
)


def read_trainer_config(folder: Path) -> dict:
    """The reference model's config.json, or a clear error for a run folder or another model."""
    if not folder.is_dir():
        raise FileNotFoundError(f"reference checkpoint folder {str(folder)!r} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        steps = sorted((p for p in folder.glob("checkpoint-*") if (p / "config.json").is_file()), key=_step)
        if steps:
            raise ValueError(
                f"{str(folder)!r} is a training run folder; pass one of its checkpoints: "
                f"{', '.join(p.name for p in steps)} (the newest is {steps[-1].name})"
            )
        raise ValueError(f"{str(folder)!r} is not a reference MetaQuery checkpoint: it has no config.json")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else f"none (a JSON {type(data).__name__})"
        raise ValueError(
            f"{str(config)!r} has model_type {found!r}; a reference MetaQuery checkpoint has {MODEL_TYPE!r}"
        )
    for key, required in (
        ("num_metaqueries", True),
        ("connector_num_hidden_layers", False),
        ("max_input_text_tokens", False),
    ):
        value = data.get(key)
        if (required or value is not None) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{str(config)!r} has {key} {value!r}; it must be a whole number >= 1")
    return data


def _step(path: Path) -> int:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if tail.isdigit() else -1


def connector_state(weights: WeightsFolder) -> dict[str, torch.Tensor]:
    """The reference connector's tensors under this pack's Connector names."""
    state = {}
    for key, tensor in weights.under(CONNECTOR).items():
        module, _, rest = key.partition(".")
        if module == "0" and rest.startswith("layers."):
            for old, new in LAYER_RENAMES:
                rest = rest.replace(old, new)
            state[rest] = tensor
        elif module in PROJECTION:
            state[f"{PROJECTION[module]}.{rest}"] = tensor
        else:
            raise ValueError(
                f"unexpected connector tensor {CONNECTOR + key!r}: the reference connector is an encoder "
                "(model.connector.0.layers.*) then model.connector.1 / .3 (Linear) and .4 (RMSNorm)"
            )
    if "proj.0.weight" not in state:
        raise ValueError(f"the checkpoint has no {CONNECTOR}1.weight: not a reference MetaQuery model's weights")
    return state


def connector_config(state: dict[str, torch.Tensor], mllm_width: int, decoder_family: str) -> ConnectorConfig:
    """The layout the tensors have: depth from the layer indices, heads from the per-head qk-norm scale."""
    out_width, width = state["proj.0.weight"].shape  # (C, W)
    if width != mllm_width:
        raise ValueError(f"the connector reads width {width} but the MLLM's embeddings have width {mllm_width}")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if depth and "layers.0.attn.q_norm.weight" not in state:
        raise ValueError(
            f"the checkpoint has no {CONNECTOR}0.layers.0.self_attn.q_norm.gamma, the per-head qk-norm every "
            "reference connector layer has (its shape gives the head count)"
        )
    heads = state["layers.0.attn.q_norm.weight"].shape[0] if depth else None  # (H, 1, d)
    return ConnectorConfig(
        in_width=mllm_width,
        out_width=out_width,
        depth=depth,
        heads=heads,
        layer_style="reference",
        final_norm=False,
        out_norm_scale=math.sqrt(5.5) if decoder_family == "sana" else 1.0,  # init only: the weights replace it
        out_norm_eps=1e-5,
        init_std=0.014,
    )


def embedding_key(weights: WeightsFolder) -> str:
    found = [k for k in weights.keys() if k.startswith(BACKBONE) and k.endswith("embed_tokens.weight")]
    if len(found) != 1:
        raise ValueError(
            f"expected one MLLM input embedding table ({BACKBONE}...embed_tokens.weight) in the checkpoint, found "
            f"{found or 'none'}"
        )
    return found[0]


def slot_rows(weights: WeightsFolder, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lead (1, D), queries (N, D)): the rows the reference added after the base vocabulary, in the order its
    tokenizer gave them ids: <begin_of_img>, <end_of_img>, <img0> .. <img{N-1}>."""
    key = embedding_key(weights)
    rows, _ = weights.shape(key)
    base = rows - num_queries - 2
    if base < 1:
        raise ValueError(f"{key} has {rows} rows, too few for {num_queries} queries + 2 added tokens")
    added = weights.rows(key, base, rows)  # (N + 2, D)
    return added[:1], added[2:]


def mllm_family(weights: WeightsFolder) -> str:
    """The base MLLM's model_type, from what its weights contain (the families the reference trains)."""
    keys = [k for k in weights.keys() if k.startswith(BACKBONE)]
    if any("image_newline" in k for k in keys):
        return "llava_onevision"
    visual = [k for k in keys if ".visual." in k or k.startswith(BACKBONE + "visual.")]
    if any(".mlp.gate_proj." in k for k in visual):
        return "qwen2_5_vl"
    if any(".mlp.fc1." in k for k in visual):
        return "qwen2_vl"
    raise ValueError(
        "cannot tell the MLLM family from the checkpoint: no LLaVA-OneVision image_newline and no Qwen-VL vision "
        f"tower under {BACKBONE}"
    )


def decoder_family(weights: WeightsFolder, text_width: int) -> str:
    """'sana' or 'sd15' from the denoiser's tensors, checked against the connector's output width."""
    keys = {k.removeprefix(DECODER): k for k in weights.keys() if k.startswith(DECODER)}
    if "caption_projection.linear_1.weight" in keys:
        family, width = "sana", weights.shape(keys["caption_projection.linear_1.weight"])[1]
    elif cross := [k for k in keys if k.endswith("attn2.to_k.weight")]:
        family, width = "sd15", weights.shape(keys[cross[0]])[1]
    else:
        raise ValueError(f"no Sana or SD1.5 denoiser weights under {DECODER} in the checkpoint")
    if width != text_width:
        raise ValueError(f"the connector writes width {text_width} but the {family} denoiser reads width {width}")
    return family


def decoder_trained(trainer_config: dict) -> bool:
    frozen = set(trainer_config.get("modules_to_freeze") or ()) - set(trainer_config.get("modules_to_unfreeze") or ())
    return DECODER.rstrip(".") not in frozen


def is_reference_folder(folder: Path) -> bool:
    """Whether `folder` holds a reference trainer checkpoint (its config.json says model_type "metaquery"); for
    listing, so an unreadable config.json just means no."""
    config = folder / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def reference_parts(
    folder: Path, stage: Stage = "pretrain"
) -> tuple[MetaQueryConfig, dict[str, torch.Tensor], WeightsFolder, bool]:
    """(config, head state, the folder's weights, whether the reference trained its decoder) of the checkpoint in
    `folder`; the decoder tensors are read only by the caller that wants them."""
    trainer_config = read_trainer_config(folder)
    weights = WeightsFolder(folder)
    num_queries = trainer_config["num_metaqueries"]
    lead, queries = slot_rows(weights, num_queries)
    state = connector_state(weights)
    dec_family = decoder_family(weights, state["proj.0.weight"].shape[0])
    connector = connector_config(state, queries.shape[1], dec_family)
    expected_depth = trainer_config.get("connector_num_hidden_layers")
    if expected_depth is not None and expected_depth != connector.depth:
        raise ValueError(f"config.json says {expected_depth} connector layers, the weights hold {connector.depth}")
    family = mllm_family(weights)
    config = MetaQueryConfig(
        mllm_family=family,
        mllm_width=queries.shape[1],
        num_queries=num_queries,
        connector=connector,
        decoder_family=dec_family,
        decoder_text_width=connector.out_width,
        stage=stage,
        system_prompt=trainer_config.get("system_prompt"),
        max_prompt_tokens=trainer_config.get("max_input_text_tokens") or 256,
        prompt_suffix="\n",
        lead_slots=1,
        image_crop=REFERENCE_IMAGE_CROP.get(family),
        min_image_tokens=REFERENCE_MIN_IMAGE_TOKENS.get(family),
        mllm_name=Path(str(trainer_config.get("mllm_id", ""))).name,
        decoder_name=Path(str(trainer_config.get("diffusion_model_id", ""))).name,
        extra={"imported_from": "facebookresearch/metaquery trainer", "source": folder.name},
    )
    head_state = {"queries.queries": queries, "queries.lead": lead, **{f"connector.{k}": v for k, v in state.items()}}
    return config, head_state, weights, decoder_trained(trainer_config)


def load_reference(folder: str | Path) -> tuple[MetaQueryConfig, MetaQueryHead, dict[str, torch.Tensor]]:
    """The reference checkpoint in `folder` read in memory, as `load_checkpoint` reads ours: (config, head, the
    fine-tuned decoder's state when the reference trained it, else empty)."""
    config, head_state, weights, trained = reference_parts(Path(folder))
    decoder_state = own_tensors(weights.under(DECODER)) if trained else {}  # not views of the files
    return config, own_module(build_head(config, head_state)), decoder_state


def import_reference(
    folder: str | Path,
    out: str | Path,
    *,
    decoder: DecoderChoice = "auto",
    stage: Stage = "pretrain",
    overwrite: bool = False,
) -> MetaQueryConfig:
    """Write the reference checkpoint in `folder` as this pack's checkpoint `out`; returns its config.

    decoder: "auto" takes the denoiser's weights when the reference trained them, "include" / "skip" always / never.
    """
    folder, out = Path(folder), Path(out)
    check_request(out, overwrite, decoder, folder)
    config, head_state, weights, trained = reference_parts(folder, stage)
    take_decoder = decoder == "include" or (decoder == "auto" and trained)
    write_imported(out, config, head_state, weights.under(DECODER) if take_decoder else None)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = importer_parser(
        "python -m metaqueries_core.importers.reference",
        "Convert a MetaQuery reference-trainer checkpoint folder into a ComfyUI-MetaQueries checkpoint.",
        "the reference checkpoint folder (config.json + model weights)",
    )
    a = parser.parse_args(argv)
    return run_import(
        lambda: import_reference(a.source, a.out, decoder=a.decoder, stage=a.stage, overwrite=a.overwrite), a.out
    )


if __name__ == "__main__":
    sys.exit(main())
