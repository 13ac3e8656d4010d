"""The MetaQuery reference trainer's layout, built from tiny models of the real classes: its connector (written out
from its published description, independently of this pack's connector code) and the Trainer folder it saves.
Shared by the importer tests and the node tests."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForImageTextToText, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb

SYSTEM = "Describe the picture."


class RefQKNorm(nn.Module):
    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, 1, dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.gamma * x.shape[-1] ** 0.5


class RefAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width, bias=False)
        self.q_norm, self.k_norm = RefQKNorm(heads, self.head_dim), RefQKNorm(heads, self.head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat([angles, angles], -1)[None]  # (1, N, d)
        q, k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class RefLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        config = Qwen2Config(
            hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, hidden_act="silu"
        )
        self.self_attn = RefAttention(width, heads)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(width, eps=1e-6)
        self.post_attention_layernorm = Qwen2RMSNorm(width, eps=1e-6)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class RefEncoder(nn.Module):
    def __init__(self, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RefLayer(width, heads) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def reference_connector(width: int, out_width: int, depth: int, seed: int = 0) -> nn.Sequential:
    """The reference connector with every weight random (norm scales too, so their layout matters)."""
    torch.manual_seed(seed)
    connector = nn.Sequential(
        RefEncoder(width, max(1, width // 64), depth),
        nn.Linear(width, out_width),
        nn.GELU(approximate="tanh"),
        nn.Linear(out_width, out_width),
        DiffusersRMSNorm(out_width, eps=1e-5, elementwise_affine=True),
    )
    with torch.no_grad():
        for name, p in connector.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 or "gamma" in name else 0.08 * torch.randn_like(p))
    return connector.eval()


def write_reference_folder(folder, mllm_path, decoder_path, *, num_queries=8, depth=2, freeze_decoder=False):
    """What the reference trainer saves for a tiny Qwen2.5-VL + Sana MetaQuery, in two shards with an index.
    Returns (connector, added embedding rows (N + 2, D), the fine-tuned denoiser's state)."""
    mllm = AutoModelForImageTextToText.from_pretrained(mllm_path)
    torch.manual_seed(1)
    backbone = dict(mllm.state_dict())
    key = next(k for k in backbone if k.endswith("embed_tokens.weight"))
    added = torch.randn(num_queries + 2, backbone[key].shape[1]) * 0.5
    backbone[key] = torch.cat([backbone[key], added])
    denoiser = SanaTransformer2DModel.from_pretrained(decoder_path / "transformer")
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in denoiser.state_dict().items()}
    connector = reference_connector(added.shape[1], denoiser.config.caption_channels, depth)
    shards = {
        "model-00001-of-00002.safetensors": {f"model.mllm_backbone.{k}": v for k, v in backbone.items()},
        "model-00002-of-00002.safetensors": {
            **{f"model.connector.{k}": v for k, v in connector.state_dict().items()},
            **{f"model.transformer.{k}": v for k, v in tuned.items()},
            "vae.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3),
        },
    }
    folder.mkdir(parents=True)
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    index = {"weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    frozen = ["vae", "model.mllm_backbone"] + (["model.transformer"] if freeze_decoder else [])
    config = {
        "model_type": "metaquery",
        "num_metaqueries": num_queries,
        "connector_num_hidden_layers": depth,
        "system_prompt": SYSTEM,
        "max_input_text_tokens": 256,
        "modules_to_freeze": frozen,
        "modules_to_unfreeze": ["model.mllm_backbone.model.embed_tokens"],
        "mllm_id": "/models/Qwen2.5-VL-3B-Instruct",
        "diffusion_model_id": "/models/Sana_1600M_512px_diffusers",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return connector, added, tuned
