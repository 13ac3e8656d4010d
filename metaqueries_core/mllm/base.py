"""The MLLM adapter interface: chat inputs with images, N query slots after the prompt, frozen forward, read-out.

One subclass per family owns that family's quirks (image token expansion, vision features, rotary positions).
Everything here treats the MLLM as frozen: it is put in eval mode with `requires_grad=False` at load time, and no
method changes its weights.
"""

from __future__ import annotations

import enum
import inspect
import logging
from abc import ABC
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from ..images import ensure_max_aspect, ensure_min_side, to_rgb
from ..memory import cpu_bytes
from .checkpointing import checkpointed_layers
from .layout import PLAIN, PromptLayout

log = logging.getLogger(__name__)

# The reference implementation's system prompt (DESIGN.md section 1).
DEFAULT_SYSTEM_PROMPT = (
    "You will be given an image or its caption. Please describe the content of the image in detail in your own words."
)


def load_image_processor(path: Path) -> Any:
    """The folder's image processor; transformers before 5.18 needs torchvision for it, which says so unhelpfully."""
    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError as e:
        raise ImportError(
            f"{e}\nThis pack needs no torchvision with transformers 5.18 or newer (installed: {transformers.__version__}):"
            " pip install -U 'transformers>=5.18,<6'"
        ) from e


def cache_keyword(lm: nn.Module) -> str:
    """The name of the KV cache in `lm`'s forward and output: `cache` from transformers 5.24, `past_key_values` in
    5.0-5.23 (5.24 still accepts the old name, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class Default(enum.Enum):
    """Sentinel type: "use the adapter's own setting" (None is a valid system prompt: none at all)."""

    TOKEN = 0


DEFAULT = Default.TOKEN

# Where the caption goes in a rendered prompt until it is tokenised (a private-use character no template writes).
CAPTION_MARK = "\ue000"


@dataclass
class PromptBatch:
    """A tokenised, left-padded batch whose last `num_queries` positions are query slots.

    `prompt_embeds` already holds the token embeddings with the vision features merged in; the query slots are
    zero there and get the learnable queries in `MLLMAdapter.query_states`.
    """

    input_ids: torch.Tensor  # (B, L) query slots hold the pad id
    attention_mask: torch.Tensor  # (B, L) 0 on left padding
    position_ids: torch.Tensor  # (B, L) or (3, B, L) for multimodal rotary families
    prompt_embeds: torch.Tensor  # (B, L, D)
    num_queries: int
    model_inputs: dict[str, Any]  # the family's HF forward kwargs without query slots (for generate / captioning)

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.num_queries


class MLLMAdapter(ABC):
    """Frozen MLLM + its tokenizer / image processor, seen through one interface."""

    model_types: ClassVar[tuple[str, ...]]  # `config.model_type` values this adapter serves
    image_token: ClassVar[str | None] = None  # placeholder string the chat template writes per image (None: text-only)
    default_max_images: ClassVar[int] = 0

    def __init__(
        self,
        *,
        model: nn.Module,
        tokenizer: Any,
        image_processor: Any | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: int = 256,
        max_images: int | None = None,
        name: str = "",
    ) -> None:
        if tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of MLLM {name!r} has no chat template; the prompt format cannot be built")
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.max_images = self.default_max_images if max_images is None else max_images
        self.name = name
        self.gradient_checkpointing = False  # training: recompute the decoder layers on the query pass's backward
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"the tokenizer of MLLM {name!r} has neither a pad nor an eos token")
        self.pad_id = int(pad)

    def get_ram_usage(self) -> int:
        """Host memory the model's weights hold (ComfyUI's RAM cache weighs cached outputs by it)."""
        return cpu_bytes((self.model,))

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: Path, *, dtype: torch.dtype, device: str | torch.device, **options: Any) -> MLLMAdapter:
        """Load model, tokenizer and (for vision families) image processor from a local Hugging Face folder."""
        auto = AutoModelForImageTextToText if cls.image_token is not None else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = load_image_processor(path) if cls.image_token is not None else None
        return cls(model=model, tokenizer=tokenizer, image_processor=image_processor, name=str(path), **options)

    # ---- family hooks ----------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The text decoder that returns last-layer states after the final norm (the HF multimodal layout
        `model.model.language_model`; text-only families override)."""
        return self.model.model.language_model

    @property
    def width(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def family(self) -> str:
        """The loaded model's `config.model_type` (an adapter may serve several)."""
        return self.model.config.model_type

    @property
    def context_tokens(self) -> int | None:
        """The language model's context length, when its config gives one."""
        return getattr(self.language_model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def min_image_side(self) -> int:
        return 1

    # whether the image processor scales each image to a token count in a range (Qwen-VL's dynamic resolution), so a
    # checkpoint's `min_image_tokens` applies; fixed-tile families (LLaVA-OneVision, InternVL) cannot take it
    scales_images = False

    @property
    def max_image_aspect(self) -> float | None:
        """The largest long / short side ratio the image processor accepts (None: any)."""
        return None

    def image_features(
        self, images: list[list[Image.Image]], *, min_tokens: int | None = None
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Vision features per image (each (n_i, D), in batch order) and the HF kwargs that carry the pixels.
        `min_tokens` (families with `scales_images` only; `tokenize` refuses it for the others): smaller images are
        scaled up to at least this many tokens."""
        raise NotImplementedError(f"{type(self).__name__} takes images but does not implement image_features")

    def expand_image(self, num_features: int) -> str:
        """The text that replaces one image placeholder of the chat template: one image token per feature (families
        that wrap them in start / end tokens override)."""
        return self.image_token * num_features

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]
    ) -> torch.Tensor:
        """Rotary positions; plain 1D positions counting only real (non-pad) tokens."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)

    # ---- prompt building ------------------------------------------------------------------------------------
    def caption_ids(self, caption: str) -> list[int]:
        """Token ids of user text, read as plain text: typed "<image>" or "<|im_end|>" never becomes the special
        token (a placeholder without an image behind it, or a turn the user did not mean to end)."""
        return self.tokenizer(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def prompt_ids(self, text: str, caption: str) -> list[int]:
        """Token ids of a rendered prompt `text` whose CAPTION_MARK stands for `caption`: the template's own text
        with its special tokens, the caption as plain text.

        An ordinary caption is tokenised inside the whole prompt, as the reference trainer and OpenUni do (a
        tokenizer may merge the whitespace on either side of it); one that holds special-token text is tokenised on
        its own, so that text stays text."""
        as_text = self.caption_ids(caption)
        before, after = text.split(CAPTION_MARK)  # exactly one mark: `render` / `PromptLayout.fill` put it there
        if as_text == self.tokenizer(caption, add_special_tokens=False)["input_ids"]:
            return self.tokenizer(before + caption + after, add_special_tokens=False)["input_ids"]
        return (
            self.tokenizer(before, add_special_tokens=False)["input_ids"]
            + as_text
            + self.tokenizer(after, add_special_tokens=False)["input_ids"]
        )

    def truncate_caption(self, caption: str, max_tokens: int) -> str:
        ids = self.caption_ids(caption)
        if len(ids) <= max_tokens:
            return caption
        log.warning("prompt of %d tokens truncated to %d: %r", len(ids), max_tokens, caption[:80])
        return self.tokenizer.decode(ids[:max_tokens])

    def render(self, caption: str, num_images: int, system_prompt: str | None) -> str:
        """Chat-template text: [system], user = images then caption, then the assistant generation prompt."""
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        if self.image_token is None:
            messages.append({"role": "user", "content": caption})
        else:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": caption}]
            messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def check_images(self, images: list[list[Image.Image]] | None, batch: int) -> list[list[Image.Image]]:
        if images is None:
            return [[] for _ in range(batch)]
        if len(images) != batch:
            raise ValueError(f"got image lists for {len(images)} samples but {batch} prompts; give one list per prompt")
        if self.image_token is None and any(images):
            raise ValueError(
                f"MLLM {self.name!r} ({self.family}) is text-only and takes no images; give it none, or load a "
                "vision MLLM (Qwen2.5-VL, Qwen2-VL, LLaVA-OneVision, InternVL3)"
            )
        out = []
        for i, sample in enumerate(images):
            if len(sample) > self.max_images:
                raise ValueError(
                    f"sample {i} has {len(sample)} images; MLLM {self.name!r} ({self.family}) "
                    f"takes at most {self.max_images} per prompt"
                )
            fitted = [ensure_min_side(to_rgb(im), self.min_image_side) for im in sample]
            out.append([ensure_max_aspect(im, self.max_image_aspect) for im in fitted])  # padding keeps the min side
        return out

    def tokenize(
        self,
        prompts: list[str],
        images: list[list[Image.Image]] | None = None,
        *,
        system_prompt: str | None | Default = DEFAULT,
        max_prompt_tokens: int | None = None,
        layout: PromptLayout = PLAIN,
        min_image_tokens: int | None = None,
    ) -> tuple[list[list[int]], list[torch.Tensor], dict[str, Any]]:
        """Chat-formatted token rows (image placeholders expanded to the feature counts), the vision features per
        image (each (n_i, D)) and the family's pixel kwargs. The features follow the caller's gradient mode:
        `prepare` runs without gradient, teaching with it (the vision tower learns there). `layout` adds a
        checkpoint's suffix or replaces the chat template by its own; `min_image_tokens` scales smaller images up
        (`scales_images` families)."""
        system_prompt = self.system_prompt if system_prompt is DEFAULT else system_prompt
        max_tokens = self.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single string")
        images = self.check_images(images, len(prompts))
        if layout.template and any(images):
            raise ValueError(
                "this checkpoint writes its prompts from a template (an imported OpenUni text-to-image format), "
                "which takes no input images: use it for text-to-image"
            )
        if min_image_tokens is not None and min_image_tokens < 1:
            raise ValueError(f"min_image_tokens must be >= 1 or None (the folder's minimum), got {min_image_tokens!r}")
        if min_image_tokens is not None and not self.scales_images:
            raise ValueError(
                f"min_image_tokens={min_image_tokens} applies to MLLMs that scale images to a token count (Qwen2-VL, "
                f"Qwen2.5-VL); MLLM {self.name!r} ({self.family}) gives every image fixed tiles"
            )
        feats, extra = self.image_features(images, min_tokens=min_image_tokens) if any(images) else ([], {})
        counts = iter([f.shape[0] for f in feats])
        rows = []
        for caption, sample_images in zip(prompts, images):
            caption = self.truncate_caption(caption, max_tokens)
            if layout.template:
                rows.append(self.prompt_ids(*layout.fill(caption, CAPTION_MARK)))
                continue
            text = self.render(CAPTION_MARK, len(sample_images), system_prompt) + layout.suffix
            if sample_images:
                parts = text.split(self.image_token)
                if len(parts) != len(sample_images) + 1:
                    raise ValueError(
                        f"the chat template wrote {len(parts) - 1} image placeholders for {len(sample_images)} images"
                    )
                text = parts[0] + "".join(self.expand_image(next(counts)) + p for p in parts[1:])
            rows.append(self.prompt_ids(text, caption))
        return rows, feats, extra

    def embed(self, input_ids: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings (B, L, D) with the image placeholders replaced by the vision features, in order."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        if feats:
            image_mask = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, L, 1)
            embeds = embeds.masked_scatter(image_mask, torch.cat(feats).to(embeds.dtype))
        return embeds

    def forward_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]) -> dict:
        """Keyword arguments of the family's own HF forward / generate for these tokens."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}

    @torch.no_grad()
    def prepare(
        self,
        prompts: list[str],
        images: list[list[Image.Image]] | None = None,
        *,
        num_queries: int = 0,
        system_prompt: str | None | Default = DEFAULT,
        max_prompt_tokens: int | None = None,
        layout: PromptLayout = PLAIN,
        min_image_tokens: int | None = None,
    ) -> PromptBatch:
        """Tokenise prompts (+ images), left-pad, append `num_queries` slots, embed with vision features merged.

        `system_prompt` / `max_prompt_tokens` default to the adapter's; a checkpoint passes the ones it was trained
        with, its prompt layout and its smallest image size.
        """
        rows, feats, extra = self.tokenize(
            prompts,
            images,
            system_prompt=system_prompt,
            max_prompt_tokens=max_prompt_tokens,
            layout=layout,
            min_image_tokens=min_image_tokens,
        )
        input_ids, attention_mask = left_pad(rows, self.pad_id, num_queries)  # (B, L)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        embeds = self.embed(input_ids, feats)  # (B, L, D)
        if num_queries:
            embeds[:, -num_queries:] = 0
        position_ids = self.position_ids(input_ids, attention_mask, extra)
        n = input_ids.shape[1] - num_queries
        model_inputs = self.forward_kwargs(input_ids[:, :n], attention_mask[:, :n], extra)
        return PromptBatch(input_ids, attention_mask, position_ids, embeds, num_queries, model_inputs)

    @property
    def image_token_id(self) -> int:
        """The placeholder id the model's config declares (what its own forward matches), else the tokenizer's."""
        configured = getattr(self.model.config, "image_token_id", None)
        return configured if configured is not None else self.tokenizer.convert_tokens_to_ids(self.image_token)

    # ---- the frozen forward ----------------------------------------------------------------------------------
    def query_states(self, batch: PromptBatch, queries: torch.Tensor, *, prefix_cache: bool = False) -> torch.Tensor:
        """Last-layer states (after the final norm) at the query positions: (B, N, D).

        `queries` (N, D) or (B, N, D) carries the gradient. With `prefix_cache`, the prompt runs once without autograd
        into the KV cache and only the N query positions run with autograd: attention is causal, so the prompt's
        states never depend on the queries and the result (and its gradient) is the same. With
        `self.gradient_checkpointing`, the decoder layers are recomputed in the backward pass instead of keeping their
        activations (`checkpointing.checkpointed_layers`).
        """
        b, n = batch.input_ids.shape[0], batch.num_queries
        if queries.shape[-2] != n:
            raise ValueError(f"the batch has {n} query slots but {queries.shape[-2]} queries were given")
        q = queries.to(batch.prompt_embeds.device, batch.prompt_embeds.dtype).expand(b, -1, -1)  # (B, N, D)
        lm = self.language_model
        # the context the autograd pass through the layers runs in (entered once, by one of the branches)
        recomputed = (
            checkpointed_layers(lm) if self.gradient_checkpointing and torch.is_grad_enabled() else nullcontext()
        )
        if not prefix_cache:
            embeds = torch.cat([batch.prompt_embeds[:, :-n], q], dim=1)  # (B, L, D)
            with recomputed:
                out = lm(
                    inputs_embeds=embeds,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
            return out.last_hidden_state[:, -n:]  # (B, N, D)
        p = batch.prompt_length
        with torch.no_grad():
            prefix = lm(
                inputs_embeds=batch.prompt_embeds[:, :p],
                attention_mask=batch.attention_mask[:, :p],
                position_ids=batch.position_ids[..., :p],
                use_cache=True,
            )
        key = cache_keyword(lm)
        with recomputed:
            out = lm(
                inputs_embeds=q,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids[..., p:],
                **{key: prefix[key]},
            )
        return out.last_hidden_state  # (B, N, D)

    def encode(
        self,
        prompts: list[str],
        images: list[list[Image.Image]] | None,
        queries: torch.Tensor,
        *,
        prefix_cache: bool = False,
    ) -> torch.Tensor:
        """prepare + query_states: (B, N, D)."""
        batch = self.prepare(prompts, images, num_queries=queries.shape[-2])
        return self.query_states(batch, queries, prefix_cache=prefix_cache)

    @torch.no_grad()
    def generate_text(
        self,
        prompts: list[str],
        images: list[list[Image.Image]] | None = None,
        *,
        max_new_tokens: int = 64,
        system_prompt: str | None | Default = DEFAULT,
        max_prompt_tokens: int | None = None,
        stopping_criteria: Any = None,
    ) -> list[str]:
        """Let the frozen MLLM answer (understanding): the same prompt format with no query slots, greedy.

        `max_prompt_tokens` cuts the question (None: the adapter's caption limit, the prompt format a MetaQuery
        checkpoint reads); `stopping_criteria` (a transformers StoppingCriteriaList) lets a caller cancel
        mid-answer."""
        batch = self.prepare(
            prompts, images, num_queries=0, system_prompt=system_prompt, max_prompt_tokens=max_prompt_tokens
        )
        out = self.model.generate(
            **batch.model_inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            stopping_criteria=stopping_criteria,
        )
        new = out[:, batch.input_ids.shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def left_pad(rows: list[list[int]], pad_id: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows and append `num_queries` slots: (B, L) ids and mask."""
    length = max(len(r) for r in rows) + num_queries
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        start = length - num_queries - len(r)
        ids[i, start : length - num_queries] = torch.tensor(r, dtype=torch.long)
        mask[i, start:] = 1
    return ids, mask


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the MLLM is never trained."""
    model.eval()
    model.requires_grad_(False)
    return model
