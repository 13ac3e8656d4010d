"""The trainable MetaQuery head: queries + connector, and how they turn prompts into decoder conditioning."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from .connector import Connector, ConnectorConfig
from .images import resize_center_crop, to_rgb
from .mllm import DEFAULT_SYSTEM_PROMPT, MLLMAdapter, PromptBatch, PromptLayout
from .queries import MetaQueries
from .state_fit import misfit

# MetaQueryHead's constructor arguments, which `settings()` returns: what a checkpoint config (and a training config)
# holds to rebuild the head
HEAD_KEYS = (
    "num_queries",
    "connector",
    "system_prompt",
    "max_prompt_tokens",
    "prompt_suffix",
    "prompt_template",
    "empty_prompt",
    "lead_slots",
    "image_crop",
    "min_image_tokens",
)


class MetaQueryHead(nn.Module):
    """Everything that trains on the MLLM side: N queries of the MLLM's width and the connector."""

    def __init__(
        self,
        *,
        num_queries: int,
        connector: ConnectorConfig,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: int = 256,
        prompt_suffix: str = "",
        prompt_template: str = "",
        empty_prompt: str | None = None,
        lead_slots: int = 0,
        image_crop: int | None = None,
        min_image_tokens: int | None = None,
    ) -> None:
        """`prompt_suffix`, `prompt_template`, `empty_prompt`: the caption's text beyond the chat template
        (`PromptLayout`); `lead_slots`: learned slots before the queries whose states are not read out (the
        reference code's "\\n<begin_of_img>" is prompt_suffix "\\n" and one lead slot); `image_crop`: input images
        are scaled and centre-cropped to this square before the MLLM's own processing (the reference trainer does
        it at 384 for LLaVA-OneVision), or left as they are (None); `min_image_tokens`: an MLLM that sizes images
        dynamically (Qwen-VL) scales smaller input images up to at least this many tokens (the reference trains
        Qwen2.5-VL at 256), or keeps the folder's minimum (None)."""
        if image_crop is not None and image_crop < 1:
            raise ValueError(f"image_crop must be a side in pixels >= 1 or None (no crop), got {image_crop!r}")
        if min_image_tokens is not None and min_image_tokens < 1:
            raise ValueError(
                f"min_image_tokens must be >= 1 or None (the MLLM folder's minimum), got {min_image_tokens!r}"
            )
        super().__init__()
        # the prompt format is part of what was trained: it travels with the checkpoint, not with the MLLM
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.image_crop = image_crop
        self.min_image_tokens = min_image_tokens
        self.layout = PromptLayout(suffix=prompt_suffix, template=prompt_template, empty=empty_prompt)
        self.queries = MetaQueries(
            num_queries=num_queries, width=connector.in_width, init_std=connector.init_std, lead_slots=lead_slots
        )
        self.connector = Connector(connector)

    @property
    def num_queries(self) -> int:
        return self.queries.num_queries

    def settings(self) -> dict:
        """The constructor's arguments: `MetaQueryHead(**head.settings())` is an untrained head of the same shape and
        prompt format."""
        return {
            "num_queries": self.num_queries,
            "connector": self.connector.cfg,
            "system_prompt": self.system_prompt,
            "max_prompt_tokens": self.max_prompt_tokens,
            "prompt_suffix": self.layout.suffix,
            "prompt_template": self.layout.template,
            "empty_prompt": self.layout.empty,
            "lead_slots": self.queries.lead_slots,
            "image_crop": self.image_crop,
            "min_image_tokens": self.min_image_tokens,
        }

    @classmethod
    def from_state(cls, settings: dict, state: dict[str, torch.Tensor]) -> MetaQueryHead:
        """The head `settings` describe holding `state` (its state dict, used as it is): built on the meta device and
        assigned, so no random initialisation is computed to be thrown away. Raises naming the keys that do not fit."""
        with torch.device("meta"):
            head = cls(**settings)
        if problems := misfit(head, state):
            raise ValueError(problems)
        head.load_state_dict(state, assign=True)
        return head

    def prepare(
        self, mllm: MLLMAdapter, prompts: list[str], images: list[list[Image.Image]] | None = None
    ) -> PromptBatch:
        """Tokenise with this head's prompt format and query count (input images cropped and sized as it was
        trained)."""
        if images is not None and self.image_crop is not None:
            # RGB first: Pillow resizes palette images with nearest neighbour whatever filter is asked for
            images = [[resize_center_crop(to_rgb(im), self.image_crop) for im in sample] for sample in images]
        return mllm.prepare(
            prompts,
            images,
            num_queries=self.queries.lead_slots + self.num_queries,
            system_prompt=self.system_prompt,
            max_prompt_tokens=self.max_prompt_tokens,
            layout=self.layout,
            min_image_tokens=self.min_image_tokens,
        )

    def states(self, mllm: MLLMAdapter, batch: PromptBatch, *, prefix_cache: bool = False) -> torch.Tensor:
        """MLLM last-layer states at the query positions: (B, N, D) on the MLLM's device and dtype."""
        states = mllm.query_states(batch, self.queries(), prefix_cache=prefix_cache)  # (B, P + N, D)
        return states[:, self.queries.lead_slots :]

    def connect(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query states -> (cond (B, N, C), mask (B, N)) on the head's device and dtype; the mask is all ones (every
        query is a real token)."""
        param = self.queries.queries
        cond = self.connector(states.to(device=param.device, dtype=param.dtype))  # (B, N, C)
        mask = torch.ones(cond.shape[:2], dtype=torch.long, device=cond.device)  # (B, N)
        return cond, mask

    def condition(
        self, mllm: MLLMAdapter, batch: PromptBatch, *, prefix_cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared prompts -> (cond (B, N, C), mask (B, N))."""
        return self.connect(self.states(mllm, batch, prefix_cache=prefix_cache))

    def encode(
        self,
        mllm: MLLMAdapter,
        prompts: list[str],
        images: list[list[Image.Image]] | None = None,
        *,
        prefix_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.prepare(mllm, prompts, images)
        return self.condition(mllm, batch, prefix_cache=prefix_cache)
