"""The trainable connector ("Enc-Proj"): a bidirectional transformer encoder over the N query states, then a
projection into the decoder's text width.

Layer styles:
- "qwen2" (this pack's default): Qwen2-style layers (RMSNorm, RoPE over query positions, QK RMS-norm shared by the
  heads before RoPE, SwiGLU MLP) and a final RMSNorm;
- "reference": the MetaQuery reference code's layers exactly (the same, but RoPE first and then an RMS qk-norm with a
  scale per head); with final_norm off, its encoder, so its checkpoints import (`metaqueries_core.importers`);
- "siglip": OpenUni's layers (LayerNorm, GELU MLP; with pos_embed "none", qk_norm off, final_norm off and projection
  "linear", its connector).
Then Linear-GELU(tanh)-Linear-RMSNorm ("mlp_norm") or one Linear into the decoder's text width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LayerStyle = Literal["qwen2", "reference", "siglip"]
Projection = Literal["mlp_norm", "linear"]


@dataclass(frozen=True)
class ConnectorConfig:
    in_width: int  # MLLM hidden size
    out_width: int  # decoder text width C (Sana caption_channels 2304, SD1.5 768)
    width: int | None = None  # encoder width; None = in_width (as the reference); otherwise an input Linear
    depth: int = 24  # reference: 24 layers
    heads: int | None = None  # None = width // 64 (at least 1)
    mlp_ratio: float = 4.0
    layer_style: LayerStyle = "qwen2"
    pos_embed: Literal["rope", "none"] = "rope"
    qk_norm: bool = True
    final_norm: bool = True  # a norm after the last layer (this pack's layouts); the reference and OpenUni have none
    projection: Projection = "mlp_norm"
    out_norm_scale: float = 1.0  # RMSNorm weight at init: sqrt(5.5) for Sana, 1 for SD1.5
    out_norm_eps: float = 1e-6  # the reference's output RMSNorm (diffusers') uses 1e-5
    init_std: float = 0.014
    rope_theta: float = 10000.0
    # > 0: a learned embedding per query slot added to the output. The decoder's cross-attention has no positions
    # of its own, so without it the slot that says "red" for the first object and the one that says "blue" for the
    # second look alike (binding colours to shapes); must equal the number of queries
    num_slots: int = 0

    def __post_init__(self) -> None:
        if self.layer_style not in ("qwen2", "reference", "siglip"):
            raise ValueError(f"layer_style {self.layer_style!r} not in ['qwen2', 'reference', 'siglip']")
        if self.layer_style == "reference" and not self.qk_norm:
            raise ValueError("layer_style 'reference' always has its per-head qk-norm; qk_norm must be true")
        if self.projection not in ("mlp_norm", "linear"):
            raise ValueError(f"projection {self.projection!r} not in ['linear', 'mlp_norm']")
        if self.pos_embed not in ("rope", "none"):
            raise ValueError(f"pos_embed {self.pos_embed!r} not in ['none', 'rope']")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if self.heads is not None and self.heads < 1:
            raise ValueError(f"heads must be >= 1 (or None: width / 64), got {self.heads}")
        if self.out_norm_eps <= 0:
            raise ValueError(f"out_norm_eps must be > 0, got {self.out_norm_eps}")
        if self.num_slots < 0:
            raise ValueError(f"num_slots must be >= 0 (0: no slot embedding), got {self.num_slots}")
        if self.inner_width % self.num_heads:
            raise ValueError(f"encoder width {self.inner_width} is not divisible by {self.num_heads} heads")
        if self.depth and self.pos_embed == "rope" and (self.inner_width // self.num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head size; encoder width {self.inner_width} / {self.num_heads} heads "
                f"= {self.inner_width // self.num_heads} (choose fewer heads, or pos_embed 'none')"
            )

    @property
    def inner_width(self) -> int:
        return self.width or self.in_width

    @property
    def mlp_width(self) -> int:
        # rounded: a ratio read off the weights (hidden / width) does not always multiply back (11 * (15 / 11) < 15)
        return round(self.inner_width * self.mlp_ratio)

    @property
    def num_heads(self) -> int:
        return self.heads or max(1, self.inner_width // 64)

    def to_dict(self) -> dict:
        return asdict(self)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding over the sequence axis of x (B, H, N, d), rotate-half convention."""
    n, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * freqs  # (N, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (N, d)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm on inputs cast to the weight's dtype. Under bf16 autocast the inputs arrive in bf16 while trained
    weights stay fp32, and torch's fused kernel needs both alike (else it warns and takes the unfused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class HeadRMSNorm(nn.Module):
    """The reference's qk-norm: x / |x| * sqrt(d), scaled per head and channel by a (H, 1, d) weight."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.weight * x.shape[-1] ** 0.5  # (B, H, N, d)


class Attention(nn.Module):
    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        w, self.heads, self.cfg = cfg.inner_width, cfg.num_heads, cfg
        bias = cfg.layer_style == "siglip"
        self.q_proj = nn.Linear(w, w, bias=True)
        self.k_proj = nn.Linear(w, w, bias=True)
        self.v_proj = nn.Linear(w, w, bias=True)
        self.o_proj = nn.Linear(w, w, bias=bias)
        head_dim = w // self.heads
        # the reference normalises after RoPE with a scale per head; the other styles before RoPE, shared by heads
        self.norm_after_rope = cfg.layer_style == "reference"
        if not cfg.qk_norm:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        elif self.norm_after_rope:
            self.q_norm, self.k_norm = HeadRMSNorm(self.heads, head_dim), HeadRMSNorm(self.heads, head_dim)
        else:
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if not self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, d)
        if self.cfg.pos_embed == "rope":
            q, k = rope(q, self.cfg.rope_theta), rope(k, self.cfg.rope_theta)
        if self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # bidirectional: (B, H, N, d)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        w, hidden = cfg.inner_width, cfg.mlp_width
        self.swiglu = cfg.layer_style != "siglip"
        if self.swiglu:
            self.gate_proj = nn.Linear(w, hidden, bias=False)
            self.up_proj = nn.Linear(w, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, w, bias=False)
        else:
            self.fc1 = nn.Linear(w, hidden)
            self.fc2 = nn.Linear(hidden, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm(cfg: ConnectorConfig) -> nn.Module:
    """The norm of the encoder's layers (and of its end, with final_norm): LayerNorm in the SigLIP style, RMSNorm in
    the Qwen2-based ones."""
    if cfg.layer_style == "siglip":
        return nn.LayerNorm(cfg.inner_width, eps=1e-6)
    return RMSNorm(cfg.inner_width, eps=1e-6)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = layer_norm(cfg), Attention(cfg), layer_norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, N, W)
        return x + self.mlp(self.norm2(x))


class Connector(nn.Module):
    """Query states (B, N, in_width) -> decoder conditioning (B, N, out_width)."""

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.inner_width
        self.in_proj = nn.Linear(cfg.in_width, w) if w != cfg.in_width else nn.Identity()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.depth)])
        if not cfg.depth or not cfg.final_norm:
            self.norm = nn.Identity()
        else:
            self.norm = layer_norm(cfg)
        if cfg.projection == "mlp_norm":
            self.proj = nn.Sequential(
                nn.Linear(w, cfg.out_width),
                nn.GELU(approximate="tanh"),
                nn.Linear(cfg.out_width, cfg.out_width),
                RMSNorm(cfg.out_width, eps=cfg.out_norm_eps),
            )
        else:
            self.proj = nn.Linear(w, cfg.out_width)
        # (N, C) slot identities, the scale of the normed output (Sana: sqrt(5.5))
        self.slot_embed = nn.Parameter(torch.empty(cfg.num_slots, cfg.out_width)) if cfg.num_slots else None
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.projection == "mlp_norm":
            nn.init.constant_(self.proj[-1].weight, self.cfg.out_norm_scale)
        if self.slot_embed is not None:
            nn.init.normal_(self.slot_embed, std=self.cfg.out_norm_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot_embed is not None and x.shape[1] != self.cfg.num_slots:
            raise ValueError(
                f"this connector has a slot embedding for {self.cfg.num_slots} queries, got {x.shape[1]} query states"
            )
        x = self.in_proj(x)  # (B, N, W)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        out = self.proj(self.norm(x))  # (B, N, C)
        return out if self.slot_embed is None else out + self.slot_embed  # (B, N, C)


SANA_OUT_NORM_SCALE = math.sqrt(5.5)
