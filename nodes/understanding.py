"""MLLM Describe / Ask: the frozen MLLM still understands images; ask it about them."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from metaqueries_core.mllm import MLLMAdapter

from . import comfy_env
from .common import CATEGORY, MLLM, image_lists, tip


class InterruptCheck(StoppingCriteria):
    """Checked after every generated token: advances the node's progress bar (one step a token, up to
    max_new_tokens) and raises ComfyUI's interrupt so a long answer can be cancelled."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        comfy_env.throw_if_interrupted()
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Describe:
    DESCRIPTION = (
        "Asks the frozen MLLM a question about an image (greedy decoding) and returns its answer. MetaQueries never "
        "change the MLLM, so it understands exactly as before. An image batch asks once per image, one answer a line."
    )
    CATEGORY = f"{CATEGORY}/understanding"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The MLLM's answer (one line per image of the batch).",)
    FUNCTION = "ask"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, tip("The frozen MLLM from Load MLLM.")),
                "question": (
                    "STRING",
                    tip("What to ask about the image.", multiline=True, default="Describe this image."),
                ),
                "system_prompt": (
                    "STRING",
                    tip(
                        "System message; empty uses the chat template's own default. Use the prompt format the MLLM "
                        "was taught with, if any.",
                        multiline=True,
                        default="",
                    ),
                ),
                "max_new_tokens": ("INT", tip("Longest answer, in tokens.", default=128, min=1, max=4096)),
            },
            "optional": {"image": ("IMAGE", tip("Image(s) to ask about; without one the MLLM answers from text."))},
        }

    def ask(
        self,
        mllm: MLLMAdapter,
        question: str,
        system_prompt: str,
        max_new_tokens: int,
        image: torch.Tensor | None = None,
    ) -> tuple[str]:
        images = None if image is None else image_lists({"image": image})
        prompts = [question] * (1 if images is None else len(images))
        bar = comfy_env.progress_bar(max_new_tokens)
        answers = mllm.generate_text(
            prompts,
            images,
            max_new_tokens=max_new_tokens,
            system_prompt=system_prompt.strip() or None,
            max_prompt_tokens=mllm.context_tokens,  # a question, not a MetaQuery caption: no 256-token cut
            stopping_criteria=StoppingCriteriaList([InterruptCheck(bar)]),
        )
        bar.update_absolute(max_new_tokens, max_new_tokens)  # an answer may end early
        return ("\n".join(answers),)
