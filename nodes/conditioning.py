"""Conditioning nodes: prompt (+ images) -> query states -> ComfyUI CONDITIONING, and three-branch edit conditioning."""

from __future__ import annotations

import torch

from metaqueries_core.checkpoint import check_compatible
from metaqueries_core.mllm import MLLMAdapter
from metaqueries_core.sampling import branch_prompts

from .common import (
    CATEGORY,
    CHECKPOINT,
    MLLM,
    QUERY_STATES,
    MetaQueryCheckpoint,
    QueryStates,
    image_lists,
    tip,
    to_conditioning,
)


def encode_queries(
    mllm: MLLMAdapter, checkpoint: MetaQueryCheckpoint, prompts: list[str], images: list | None
) -> torch.Tensor:
    """MLLM states at the query positions (B, N, D); the queries are moved to the MLLM's device."""
    check_compatible(checkpoint.config, mllm=mllm)
    head = checkpoint.head
    with torch.no_grad():
        return head.states(mllm, head.prepare(mllm, prompts, images))  # (B, N, D)


def apply_connector(checkpoint: MetaQueryCheckpoint, states: torch.Tensor) -> torch.Tensor:
    """Query states (B, N, D) -> decoder conditioning (B, N, C) on the connector's device and dtype."""
    with torch.no_grad():
        return checkpoint.head.connect(states)[0]  # (B, N, C)


_MLLM_TIP = "The frozen MLLM the checkpoint was trained with (its family and width must match)."
_CHECKPOINT_TIP = "MetaQuery checkpoint: the queries read the MLLM, the connector maps them to the decoder."


class Encode:
    DESCRIPTION = (
        "Runs the frozen MLLM on the prompt (and optional image) with the checkpoint's learnable queries appended and "
        "returns the MLLM's states at the query positions. Feed them to MetaQuery Connector. An image batch gives one "
        "sample per image, all with this prompt."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (QUERY_STATES,)
    RETURN_NAMES = ("query_states",)
    OUTPUT_TOOLTIPS = ("MLLM states at the query positions (B, N, MLLM width), bound to this checkpoint.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, tip(_MLLM_TIP)),
                "checkpoint": (CHECKPOINT, tip(_CHECKPOINT_TIP)),
                "prompt": (
                    "STRING",
                    tip("Caption or instruction; empty gives the unconditional branch.", multiline=True, default=""),
                ),
            },
            "optional": {
                "image": ("IMAGE", tip("Optional input image(s) shown to the MLLM before the prompt.")),
            },
        }

    def encode(
        self, mllm: MLLMAdapter, checkpoint: MetaQueryCheckpoint, prompt: str, image: torch.Tensor | None = None
    ) -> tuple[QueryStates]:
        images = None if image is None else image_lists({"image": image})
        prompts = [prompt] * (1 if images is None else len(images))
        return (QueryStates(encode_queries(mllm, checkpoint, prompts, images), checkpoint),)


class Connector:
    DESCRIPTION = (
        "Maps query states through the checkpoint's connector to decoder conditioning: a standard CONDITIONING "
        "[[tensor (B, N, C), {}]]. With an SD1.5-width (768) checkpoint it drives core KSampler."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Decoder conditioning (B, N, decoder text width).",)
    FUNCTION = "connect"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"query_states": (QUERY_STATES, tip("Output of MetaQuery Encode."))}}

    def connect(self, query_states: QueryStates) -> tuple[list]:
        checkpoint = query_states.checkpoint
        return (to_conditioning(apply_connector(checkpoint, query_states.states), checkpoint=checkpoint),)


class EditConditioning:
    DESCRIPTION = (
        "Editing / subject-driven conditioning in one batched MLLM pass: three CONDITIONING outputs, "
        "positive = instruction + images, image_negative = negative prompt + images, negative = negative prompt + "
        "black images. Use them with Diffusion Sample (positive, negative, image_negative) or with core "
        "DualCFGGuider (cond1 = positive, cond2 = image_negative, negative = negative; cfg_conds = text guidance, "
        "cfg_cond2_negative = image guidance)."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "image_negative", "negative")
    OUTPUT_TOOLTIPS = (
        "Instruction + images (DualCFGGuider cond1).",
        "Negative prompt + images: the image-only branch (DualCFGGuider cond2).",
        "Negative prompt + black images: the fully unconditional branch (DualCFGGuider negative).",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        ref = "Optional further reference image (subject-driven generation)."
        return {
            "required": {
                "mllm": (MLLM, tip(_MLLM_TIP)),
                "checkpoint": (CHECKPOINT, tip(_CHECKPOINT_TIP)),
                "instruction": (
                    "STRING",
                    tip("Edit instruction or subject-driven prompt.", multiline=True, default=""),
                ),
                "negative_prompt": (
                    "STRING",
                    tip("Text of the unconditional branches (usually empty).", multiline=True, default=""),
                ),
                "image_1": ("IMAGE", tip("Source image (a batch gives one sample per image).")),
            },
            "optional": {"image_2": ("IMAGE", tip(ref)), "image_3": ("IMAGE", tip(ref))},
        }

    def encode(
        self,
        mllm: MLLMAdapter,
        checkpoint: MetaQueryCheckpoint,
        instruction: str,
        negative_prompt: str,
        image_1: torch.Tensor,
        image_2: torch.Tensor | None = None,
        image_3: torch.Tensor | None = None,
    ) -> tuple[list, list, list]:
        named = {"image_1": image_1, "image_2": image_2, "image_3": image_3}
        images = image_lists({k: v for k, v in named.items() if v is not None})
        prompts, branch_images = branch_prompts([instruction] * len(images), negative_prompt, images, 3)
        states = encode_queries(mllm, checkpoint, prompts, branch_images)  # (3B, N, D)
        cond = apply_connector(checkpoint, states)  # (3B, N, C) in branch order [uncond, image-only, cond]
        uncond, image_only, positive = cond.chunk(3)
        return tuple(to_conditioning(c, checkpoint=checkpoint) for c in (positive, image_only, uncond))
