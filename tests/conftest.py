"""Shared fixtures: tiny models of every supported class, written to disk once per session and loaded from there."""

from __future__ import annotations

import logging

import pytest
import torch

from metaqueries_core.mllm import load_mllm
from metaqueries_core.tinykit import write_tiny_mllm

# one thread: on the 2-core CI machine tiny-model tests run faster without intra-op threading
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def mllm_folder(tiny_root):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = write_tiny_mllm(family, tiny_root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def mllm_loader(mllm_folder):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_mllm(mllm_folder(family))
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="session")
def decoder_loader(tiny_root):
    """Tiny decoders loaded from disk: 'sana' (text width 64) and 'sd15' (text width 32)."""
    from metaqueries_core.decoders import load_decoder
    from metaqueries_core.decoders.tiny import write_tiny_sana, write_tiny_sd15

    writers = {"sana": lambda p: write_tiny_sana(p), "sd15": lambda p: write_tiny_sd15(p)}
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_decoder(writers[family](tiny_root / f"decoder_{family}"))
        return cache[family]

    return get


@pytest.fixture
def make_head():
    """A small MetaQuery head between an MLLM adapter and a decoder adapter."""
    from metaqueries_core.connector import ConnectorConfig
    from metaqueries_core.head import MetaQueryHead

    def make(mllm, decoder, *, num_queries: int = 8, depth: int = 1, seed: int = 0, slot_embed: bool = False):
        torch.manual_seed(seed)
        cfg = ConnectorConfig(
            in_width=mllm.width,
            out_width=decoder.text_width,
            depth=depth,
            init_std=0.05,
            num_slots=num_queries if slot_embed else 0,
        )
        return MetaQueryHead(num_queries=num_queries, connector=cfg)

    return make
