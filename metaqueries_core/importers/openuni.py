"""Import OpenUni's checkpoints (wusize/OpenUni: `.pth` state dicts of its InternVL3 + Sana models, such as the
released openuni_b_internvl3_1b_sana_0_6b_512_hf_text2image23m.pth) into this pack's checkpoint format.

What they hold, and where it goes:
- `meta_queries` (N, D) -> the queries;
- `connector.layers.*` (SigLIP-style layers: LayerNorm, attention with biases, GELU(tanh) MLP; no positions, no
  final norm) and `projector` (OpenUni's default "enc_proj": one Linear into Sana's caption width) -> the connector
  with layer style "siglip" and projection "linear"; "proj_enc_proj" checkpoints (`projector.0`, `projector.1`) put
  their first Linear in front of the encoder, as the connector's input projection;
- `transformer.*` (the Sana transformer, when the checkpoint fine-tuned it) -> `decoder.*`;
- the frozen InternVL3 is not taken: load the transformers-native InternVL3 folder (InternVL3-1B-hf for OpenUni-B,
  InternVL3-2B-hf for OpenUni-L) as the MLLM; the importer reads its family and width from that folder.
OpenUni writes its text-to-image prompt by hand, not with the chat template:
"<|im_start|>user\\nGenerate an image: {caption}<|im_end|>\\n<|im_start|>assistant\\n<img>", and the unconditional
branch says "Generate an image." instead: the imported checkpoint's prompt template and empty prompt. It takes no
input images (OpenUni's image-to-image path feeds the vision tower its own way).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from ..checkpoint import MetaQueryConfig, Stage
from ..connector import ConnectorConfig
from ..head import MetaQueryHead
from ..memory import own_module, own_tensors
from ..mllm import adapter_for, read_model_type
from .output import (
    DecoderChoice,
    build_head,
    check_request,
    importer_parser,
    positive_int,
    run_import,
    write_imported,
)
from .weights import load_weights_only

RELEASED_FAMILY = "internvl"  # the MLLM of every released OpenUni model (InternVL3-1B / 2B, -hf form)
TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n<img>"
PROMPT = TEMPLATE.replace("{input}", "Generate an image: {caption}")
EMPTY_PROMPT = TEMPLATE.replace("{input}", "Generate an image.")
LAYER_RENAMES = ((".self_attn.out_proj.", ".attn.o_proj."), (".self_attn.", ".attn."), (".layer_norm", ".norm"))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read with weights_only (no code runs), without a DeepSpeed `module.` prefix."""
    if not path.is_file():
        raise FileNotFoundError(f"OpenUni checkpoint {str(path)!r} does not exist")
    state = load_weights_only(path)
    for wrapper in ("state_dict", "model", "module"):  # how training scripts commonly wrap a state dict
        if isinstance(state, dict) and "meta_queries" not in state and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or "meta_queries" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"{str(path)!r} is not an OpenUni checkpoint: it has no 'meta_queries' tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def connector_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenUni's connector and projector tensors under this pack's Connector names."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("connector.layers."):
            name = key.removeprefix("connector.")
            for old, new in LAYER_RENAMES:
                name = name.replace(old, new)
            out[name] = tensor
        elif key.startswith("connector."):
            raise ValueError(f"unexpected connector tensor {key!r}: OpenUni's connector holds encoder layers only")
        elif key.startswith("projector."):
            name = key.removeprefix("projector.")
            if name.startswith("0."):  # proj_enc_proj: in front of the encoder
                out[f"in_proj.{name.removeprefix('0.')}"] = tensor
            elif name.startswith("1."):
                out[f"proj.{name.removeprefix('1.')}"] = tensor
            else:
                out[f"proj.{name}"] = tensor
    if "proj.weight" not in out:
        raise ValueError(
            "the checkpoint has no output projector (projector.weight, or projector.1.weight): OpenUni's 'proj_enc' "
            "layout (the encoder at the decoder's width, nothing after it) is not supported"
        )
    return out


def connector_config(state: dict[str, torch.Tensor], mllm_width: int, heads: int | None) -> ConnectorConfig:
    """Depth from the layer indices, widths from the Linears; OpenUni's heads are not in the weights: its configs
    use 64-wide heads (14 at width 896, 24 at 1536), this pack's default."""
    out_width, width = state["proj.weight"].shape  # (C, W)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    mlp_ratio = state["layers.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    return ConnectorConfig(
        in_width=mllm_width,
        out_width=out_width,
        width=width if "in_proj.weight" in state else None,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        layer_style="siglip",
        pos_embed="none",
        qk_norm=False,
        final_norm=False,
        projection="linear",
    )


def mllm_facts(folder: Path) -> tuple[str, int]:
    """(model_type, language-model width) of a local MLLM folder, from its config.json: a family this pack loads
    (adapter_for names the supported ones, and what to load instead of InternVL's remote-code layout)."""
    family = read_model_type(folder)
    adapter_for(family)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    width = text.get("hidden_size") if isinstance(text, dict) else None
    if not isinstance(width, int):
        raise ValueError(f"{str(folder / 'config.json')!r} names no hidden_size for its language model")
    return family, width


def decoder_state(state: dict[str, torch.Tensor], text_width: int) -> dict[str, torch.Tensor]:
    found = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    proj = found.get("caption_projection.linear_1.weight")
    if found and (proj is None or proj.shape[1] != text_width):
        raise ValueError(
            f"the checkpoint's transformer.* is not a Sana transformer reading width {text_width} (caption "
            f"projection: {None if proj is None else tuple(proj.shape)})"
        )
    return found


def openuni_parts(
    state: dict[str, torch.Tensor], *, family: str, width: int, heads: int | None, mllm_name: str, source: str
) -> tuple[MetaQueryConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, head state, fine-tuned Sana state (maybe empty)) of an OpenUni state dict, for an MLLM of this
    family and width."""
    queries = state["meta_queries"]  # (N, D)
    if not torch.is_tensor(queries):
        raise ValueError(f"the checkpoint's meta_queries is a {type(queries).__name__}, not a tensor")
    if queries.ndim != 2 or queries.shape[1] != width:
        raise ValueError(
            f"the checkpoint's queries {tuple(queries.shape)} do not fit MLLM {mllm_name!r} of width {width}; "
            "OpenUni-B was trained on InternVL3-1B (width 896), OpenUni-L on InternVL3-2B (width 1536)"
        )
    connector_tensors = connector_state(state)
    connector = connector_config(connector_tensors, width, heads)
    config = MetaQueryConfig(
        mllm_family=family,
        mllm_width=width,
        num_queries=queries.shape[0],
        connector=connector,
        decoder_family="sana",
        decoder_text_width=connector.out_width,
        system_prompt=None,
        max_prompt_tokens=2048,  # OpenUni does not cut text prompts
        prompt_template=PROMPT,
        empty_prompt=EMPTY_PROMPT,
        mllm_name=mllm_name,
        extra={"imported_from": "wusize/OpenUni", "source": source},
    )
    head_state = {"queries.queries": queries, **{f"connector.{k}": v for k, v in connector_tensors.items()}}
    return config, head_state, decoder_state(state, connector.out_width)


def load_openuni(
    checkpoint: str | Path, *, heads: int | None = None
) -> tuple[MetaQueryConfig, MetaQueryHead, dict[str, torch.Tensor]]:
    """OpenUni's .pth read in memory, as `load_checkpoint` reads ours: (config, head, fine-tuned Sana state). Without
    an MLLM folder to ask, the family is OpenUni's released one, InternVL3 ("internvl", transformers-native); the
    queries give the width, and loading next to another MLLM is refused by `check_compatible`."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    width = state["meta_queries"].shape[-1]
    config, head_state, tuned = openuni_parts(
        state, family=RELEASED_FAMILY, width=width, heads=heads, mllm_name="", source=checkpoint.name
    )
    return config, own_module(build_head(config, head_state)), own_tensors(tuned)  # not views of the file


def import_openuni(
    checkpoint: str | Path,
    out: str | Path,
    *,
    mllm: str | Path,
    decoder: DecoderChoice = "auto",
    heads: int | None = None,
    stage: Stage = "pretrain",
    overwrite: bool = False,
) -> MetaQueryConfig:
    """Write OpenUni's `checkpoint` (.pth) as this pack's checkpoint `out`, for the MLLM folder `mllm`.

    decoder: "auto" / "include" take the fine-tuned Sana weights the checkpoint holds ("include" insists on them),
    "skip" leaves them out.
    """
    checkpoint, out, mllm = Path(checkpoint), Path(out), Path(mllm)
    check_request(out, overwrite, decoder, checkpoint)
    family, width = mllm_facts(mllm)
    config, head_state, tuned = openuni_parts(
        read_state(checkpoint), family=family, width=width, heads=heads, mllm_name=mllm.name, source=checkpoint.name
    )
    if decoder == "include" and not tuned:
        raise ValueError(f"{str(checkpoint)!r} holds no fine-tuned Sana weights (transformer.*) to include")
    config = dataclasses.replace(config, stage=stage)
    write_imported(out, config, head_state, tuned if decoder != "skip" and tuned else None)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = importer_parser(
        "python -m metaqueries_core.importers.openuni",
        "Convert an OpenUni .pth checkpoint into a ComfyUI-MetaQueries checkpoint.",
        "OpenUni's .pth file",
    )
    parser.add_argument("--mllm", required=True, help="the transformers-native InternVL3 folder it was trained on")
    parser.add_argument(
        "--heads", type=positive_int, default=None, help="connector heads (default: width / 64, as OpenUni)"
    )
    a = parser.parse_args(argv)
    return run_import(
        lambda: import_openuni(
            a.source, a.out, mllm=a.mllm, decoder=a.decoder, heads=a.heads, stage=a.stage, overwrite=a.overwrite
        ),
        a.out,
    )


if __name__ == "__main__":
    sys.exit(main())
