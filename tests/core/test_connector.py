"""Queries and connector: shapes, bidirectionality, positional encoding, layouts, init."""

from __future__ import annotations

import math

import pytest
import torch

from metaqueries_core.connector import SANA_OUT_NORM_SCALE, Connector, ConnectorConfig
from metaqueries_core.queries import MetaQueries

OPENUNI = dict(depth=6, layer_style="siglip", pos_embed="none", projection="linear", qk_norm=False)


@pytest.mark.parametrize("layout", [{}, OPENUNI, dict(width=32, depth=1), dict(depth=0)])
def test_shapes(layout):
    c = Connector(ConnectorConfig(in_width=64, out_width=24, **layout))
    assert c(torch.randn(2, 5, 64)).shape == (2, 5, 24)


def test_encoder_is_bidirectional():
    torch.manual_seed(0)
    c = Connector(ConnectorConfig(in_width=64, out_width=16, depth=2, init_std=0.1))
    x = torch.randn(1, 8, 64)
    y = x.clone()
    y[:, -1] += 1.0  # change only the LAST query
    assert not torch.allclose(c(x)[:, 0], c(y)[:, 0])  # the FIRST output sees it


def test_rope_makes_positions_matter_and_none_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 64)
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    for pos_embed, equivariant in (("none", True), ("rope", False)):
        c = Connector(ConnectorConfig(in_width=64, out_width=16, depth=2, pos_embed=pos_embed, init_std=0.1))
        out, out_perm = c(x), c(x[:, perm])
        assert torch.allclose(out[:, perm], out_perm, atol=1e-5) == equivariant


def test_output_norm_scale_and_init_std():
    c = Connector(ConnectorConfig(in_width=128, out_width=32, depth=1, out_norm_scale=SANA_OUT_NORM_SCALE))
    assert torch.allclose(c.proj[-1].weight, torch.full((32,), math.sqrt(5.5)))
    assert abs(c.layers[0].attn.q_proj.weight.std().item() - 0.014) < 0.003
    # the reference: heads = width / 64
    assert c.layers[0].attn.heads == 2


def test_openuni_layout_has_one_linear_projection():
    c = Connector(ConnectorConfig(in_width=64, out_width=24, **OPENUNI))
    assert isinstance(c.proj, torch.nn.Linear) and len(c.layers) == 6
    assert isinstance(c.layers[0].norm1, torch.nn.LayerNorm)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(layer_style="llama"), "layer_style 'llama'"),
        (dict(projection="mlp"), "projection 'mlp'"),
        (dict(heads=5), "not divisible by 5 heads"),
        (dict(heads=64), r"rotary positions need an even head size; encoder width 64 / 64 heads = 1"),
        (dict(layer_style="reference", qk_norm=False), "'reference' always has its per-head qk-norm"),
        (dict(out_norm_eps=0.0), "out_norm_eps must be > 0, got 0.0"),
    ],
)
def test_bad_config_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ConnectorConfig(in_width=64, out_width=8, **bad)


def test_odd_head_size_is_fine_without_rotary_positions():
    c = Connector(ConnectorConfig(in_width=64, out_width=8, depth=1, heads=64, pos_embed="none"))
    assert c(torch.randn(2, 3, 64)).shape == (2, 3, 8)


def test_queries_parameter():
    q = MetaQueries(num_queries=16, width=32)
    assert q().shape == (16, 32) and q.queries.requires_grad
    with pytest.raises(ValueError, match="positive"):
        MetaQueries(num_queries=0, width=32)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    c = Connector(ConnectorConfig(in_width=64, out_width=16, depth=2))
    x = torch.randn(2, 4, 64)
    c(x).sum().backward()
    ref = [p.grad.clone() for p in c.parameters()]
    c.zero_grad()
    c.gradient_checkpointing = True
    c.train()
    c(x).sum().backward()
    for a, p in zip(ref, c.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_slot_embedding_tells_identical_query_states_apart():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64).expand(2, 4, 64)  # every slot holds the same state
    plain = Connector(ConnectorConfig(in_width=64, out_width=16, depth=1, pos_embed="none"))
    slots = Connector(ConnectorConfig(in_width=64, out_width=16, depth=1, pos_embed="none", num_slots=4))
    assert torch.allclose(plain(x)[0, 0], plain(x)[0, 3], atol=1e-6)  # no positions: the decoder sees one token
    out = slots(x)  # (2, 4, 16)
    assert not torch.allclose(out[0, 0], out[0, 3], atol=1e-3)
    torch.testing.assert_close(out[0], out[1])  # the same slots for every sample
    assert slots.slot_embed.shape == (4, 16) and slots.slot_embed.requires_grad
    out.sum().backward()
    assert slots.slot_embed.grad is not None and slots.slot_embed.grad.abs().sum() > 0


def test_slot_embedding_refuses_another_query_count():
    c = Connector(ConnectorConfig(in_width=64, out_width=16, depth=1, num_slots=4))
    with pytest.raises(ValueError, match="slot embedding for 4 queries, got 5"):
        c(torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match="num_slots must be >= 0"):
        ConnectorConfig(in_width=64, out_width=8, num_slots=-1)


def test_rms_norms_see_their_weights_dtype_under_bf16_autocast(monkeypatch):
    """Training keeps the connector in fp32 under bf16 autocast; each RMSNorm must get an fp32 input too, or torch
    warns "Mismatch dtype between input and weight" and takes the unfused path (seen on an H200)."""
    seen = []
    real = torch.nn.functional.rms_norm

    def spy(x, shape, weight=None, eps=None):
        seen.append((x.dtype, weight.dtype))
        return real(x, shape, weight, eps)

    monkeypatch.setattr(torch.nn.functional, "rms_norm", spy)
    conn = Connector(ConnectorConfig(in_width=32, out_width=24, depth=2, heads=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conn(torch.randn(2, 5, 32))  # (B, N, in_width)
    assert out.shape == (2, 5, 24) and torch.isfinite(out).all()
    assert len(seen) == 2 * 4 + 2  # per layer: two norms and the q/k norms; the final norm; the projection's norm
    assert all(x == w == torch.float32 for x, w in seen), seen


def test_norms_follow_the_layer_style_and_final_norm():
    rms, ln = torch.nn.RMSNorm, torch.nn.LayerNorm
    for style, kind in (("qwen2", rms), ("reference", rms), ("siglip", ln)):
        c = Connector(ConnectorConfig(in_width=64, out_width=8, depth=1, layer_style=style))
        assert isinstance(c.norm, kind) and isinstance(c.layers[0].norm1, kind)
        bare = Connector(ConnectorConfig(in_width=64, out_width=8, depth=1, layer_style=style, final_norm=False))
        assert isinstance(bare.norm, torch.nn.Identity)


def test_mlp_width_read_off_weights_multiplies_back():
    # 11 * (15 / 11) is 14.999...: a ratio taken from imported weights must give the same hidden width back
    c = Connector(ConnectorConfig(in_width=11, out_width=8, depth=1, heads=1, pos_embed="none", mlp_ratio=15 / 11))
    assert c.layers[0].mlp.gate_proj.out_features == 15
