"""An independent fp32 NV-Embed-v2, written from shared/NVEMBED.md for the tests to compare the
server against. Deliberately plain: one text at a time, no padding, no transformers, no code from
the package under test -- every step (RMSNorm, RoPE, grouped-query attention, the pooling head) is
spelled out here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

LATENT_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8, "cross_dim_head": 4096, "hidden_dim": 4096, "latent_dim": 4096}


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(model_dir / name))
    return {name: tensor.float() for name, tensor in weights.items()}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weights[prefix + ".weight"] + weights[prefix + ".bias"]


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on (heads, L, head_dim), positions 0..L-1, "rotate half" layout."""
    head_dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class ReferenceNVEmbed:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.text = config["text_config"]
        self.latent = {
            **LATENT_DEFAULTS,
            **{k: v for k, v in config.get("latent_attention_config", {}).items() if k in LATENT_DEFAULTS},
        }
        self.w = load_weights(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def embed(self, text: str, instruction: str = "", max_length: int = 32768) -> np.ndarray:
        ids = self.tokenizer.encode(instruction + text + "</s>").ids[:max_length]
        skip = len(self.tokenizer.encode(instruction, add_special_tokens=False).ids) if instruction else 0
        with torch.no_grad():
            hidden = self.backbone(torch.tensor(ids))
            pooled = self.pooling_head(hidden)[skip:].mean(0)
        return (pooled / pooled.norm()).numpy()

    def backbone(self, ids: torch.Tensor) -> torch.Tensor:
        t, w = self.text, self.w
        heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
        head_dim = t.get("head_dim") or t["hidden_size"] // heads
        x = w["embedding_model.embed_tokens.weight"][ids]
        for i in range(t["num_hidden_layers"]):
            p = f"embedding_model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], t["rms_norm_eps"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim).transpose(0, 1)
            q, k = rotate(q, t["rope_theta"]), rotate(k, t["rope_theta"])
            # Each key/value head serves heads // kv_heads consecutive query heads.
            k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
            # No causal mask and no sliding window: every token sees every token.
            attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1) @ v
            x = x + attention.transpose(0, 1).reshape(len(ids), -1) @ w[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], t["rms_norm_eps"])
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return rms_norm(x, w["embedding_model.norm.weight"], t["rms_norm_eps"])

    def pooling_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens are the queries; the latents are keys and values (computed here on every call)."""
        w, p = self.w, "latent_attention_model.cross_attend_blocks."
        heads, dim_head = self.latent["num_cross_heads"], self.latent["cross_dim_head"]
        latents = layer_norm(w["latent_attention_model.latents"], w, p + "0.norm_context")
        k, v = (latents @ w[p + "0.fn.to_kv.weight"].T).chunk(2, dim=-1)
        q = layer_norm(hidden, w, p + "0.norm") @ w[p + "0.fn.to_q.weight"].T
        q, k, v = (t.view(t.shape[0], heads, dim_head).transpose(0, 1) for t in (q, k, v))
        attended = torch.softmax(q @ k.transpose(1, 2) * dim_head**-0.5, dim=-1) @ v
        x = hidden + attended.transpose(0, 1).reshape(hidden.shape[0], -1) @ w[p + "0.fn.to_out.weight"].T
        a, g = (layer_norm(x, w, p + "1.norm") @ w[p + "1.fn.net.0.weight"].T + w[p + "1.fn.net.0.bias"]).chunk(2, dim=-1)
        geglu = a * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))  # exact gelu written out
        return x + geglu @ w[p + "1.fn.net.2.weight"].T + w[p + "1.fn.net.2.bias"]
