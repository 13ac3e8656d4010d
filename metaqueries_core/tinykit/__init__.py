"""Tiny-model kit: real transformers / diffusers classes at toy sizes, tokenizers trained offline, written to disk.

Used by the tests, the embedded toy-world demo and anyone who wants to try the pipeline without weights.
"""

from .mllm import TINY_MLLMS, TinySize, check_tiny_size, write_tiny_mllm
from .tokenizer import train_bpe_tokenizer

__all__ = ["TINY_MLLMS", "TinySize", "check_tiny_size", "train_bpe_tokenizer", "write_tiny_mllm"]
