"""An offline tokenizer: a small byte-level BPE trained on generated text, carrying a family's special tokens.

Byte-level means any string tokenises (no unknown token), so prompts outside the training text still work.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Generic text so the vocabulary is not only the toy world's words.
BASE_TEXT = [
    "You will be given an image or its caption. Please describe the content of the image in detail in your own words.",
    "You are a helpful assistant.",
    "a photo of a cat sitting on a red chair next to a window",
    "make the sky blue and add a small boat on the lake",
    "what colour is the circle? how many squares are there? where is the triangle?",
    "a red circle on the left, a blue square on the right, a green triangle at the top",
    "yellow cyan magenta white orange purple black grey left right top bottom center above below",
    "one two three four the object from the image next to a",
    "system user assistant image describe question answer",
]


def train_bpe_tokenizer(
    *,
    special_tokens: list[str],
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    pad_token: str,
    eos_token: str,
    chat_template: str,
    extra: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE offline; special tokens get the first ids in the order given."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(BASE_TEXT) + list(texts)
    tok.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token, **(extra or {}))
    hf.chat_template = chat_template
    return hf
