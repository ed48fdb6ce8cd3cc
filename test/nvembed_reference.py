"""An independent fp32 NV-Embed-v2, written from docs/nv-embed-v2.md for the tests to compare the server
against. Deliberately plain: one text at a time, no padding, no batching, no transformers and nothing
from the package under test -- RMSNorm, RoPE, grouped-query attention and the pooling head are all
spelled out here.

    reference = ReferenceNVEmbed(model_dir)          # a Hugging Face snapshot of nvidia/NV-Embed-v2
    vector = reference.embed("a passage")            # float32, shape (hidden_size,), unit norm
    vector = reference.embed("a question", "Instruct: ...\\nQuery: ")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

# The published config gives latent_attention_config as just {"model_type": ...}; these are the defaults.
LATENT_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8, "cross_dim_head": 4096, "hidden_dim": 4096, "latent_dim": 4096}
BACKBONE = "embedding_model."
HEAD = "latent_attention_model."
BLOCKS = HEAD + "cross_attend_blocks."
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the pooling head uses


def load_weights(model_dir: Path, device: str) -> dict[str, torch.Tensor]:
    """Every tensor as float32, from a sharded snapshot (index + shards) or a single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for shard in shards:  # converted shard by shard, so fp16 and fp32 copies of everything never coexist
        weights.update({name: t.to(device=device, dtype=torch.float32) for name, t in load_file(model_dir / shard).items()})
    return weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return weight * centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + LAYER_NORM_EPS) + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # the exact (erf) gelu, not the tanh approximation


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (heads, L, head_dim) at positions 0..L-1, in the "rotate half" layout: dimension
    i pairs with i + head_dim/2. Angles in float32, as the published model computes them (float64 angles
    would differ by ~1e-3 rad near position 32k)."""
    length, head_dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim)
    angles = torch.arange(length, device=x.device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # (L, head_dim)
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * angles.cos() + rotated_half * angles.sin()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked softmax attention for q (heads, Lq, d) and k, v (heads, Lk, d). One head at a time, so a
    32k-token text needs one L x L score matrix (4 GiB), not one per head."""
    return torch.stack([torch.softmax(q[h] @ k[h].T * scale, dim=-1) @ v[h] for h in range(q.shape[0])])


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], heads, -1).transpose(0, 1)  # (L, heads * d) -> (heads, L, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1)  # (heads, L, d) -> (L, heads * d)


class ReferenceNVEmbed:
    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.text_config = config["text_config"]
        given = config.get("latent_attention_config") or {}
        self.latent_config = {key: given.get(key, default) for key, default in LATENT_DEFAULTS.items()}
        self.w = load_weights(model_dir, device)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.device = device

    @torch.inference_mode()
    def embed(self, text: str, instruction: str = "", max_length: int = 32768, keep_end: bool = False) -> np.ndarray:
        # The tokenizer adds BOS itself; "</s>" is the literal EOS string (id 2). Truncation keeps the first
        # max_length ids, so a truncated text loses its EOS -- as the published model does.
        # keep_end (NIM's truncate START, not in the published model): BOS and the instruction's tokens,
        # then the last ids that fit.
        ids = self.tokenizer.encode(instruction + text + "</s>").ids
        # Instruction masking drops positions 0..n-1 where n counts the instruction's own tokens (no BOS):
        # that is BOS plus the instruction, as docs/nv-embed-v2.md describes. With no instruction, n = 0 and BOS stays.
        n = len(self.tokenizer.encode(instruction, add_special_tokens=False).ids) if instruction else 0
        if keep_end and len(ids) > max_length:
            ids = ids[: 1 + n] + ids[len(ids) - (max_length - 1 - n) :]
        ids = ids[:max_length]
        if n >= len(ids):
            raise ValueError(f"max_length={max_length} leaves no token after the {n}-token instruction to pool")
        hidden = self.backbone(torch.tensor(ids, device=self.device))
        pooled = self.pooling_head(hidden)[n:].mean(dim=0)
        return (pooled / pooled.norm()).cpu().numpy()

    def backbone(self, ids: torch.Tensor) -> torch.Tensor:
        """Mistral decoder layers with full bidirectional attention (no causal mask, no sliding window)."""
        c, w = self.text_config, self.w
        heads, kv_heads, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        x = w[BACKBONE + "embed_tokens.weight"][ids]  # (L, hidden)
        for i in range(c["num_hidden_layers"]):
            p = f"{BACKBONE}layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = rope(split_heads(h @ w[p + "self_attn.q_proj.weight"].T, heads), c["rope_theta"])
            k = rope(split_heads(h @ w[p + "self_attn.k_proj.weight"].T, kv_heads), c["rope_theta"])
            v = split_heads(h @ w[p + "self_attn.v_proj.weight"].T, kv_heads)
            # Grouped-query attention: KV head j serves the consecutive query heads j*g .. j*g + g-1.
            group = heads // kv_heads
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            mixed = attention(q, k, v, 1.0 / math.sqrt(head_dim))
            x = x + merge_heads(mixed) @ w[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return rms_norm(x, w[BACKBONE + "norm.weight"], eps)

    def pooling_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Latent attention, per token: the token states are the queries; the learned latents give the keys
        and values (so they attend over a fixed set of 512 vectors, whatever the text length)."""
        w, heads, dim_head = self.w, self.latent_config["num_cross_heads"], self.latent_config["cross_dim_head"]
        latents = layer_norm(w[HEAD + "latents"], w[BLOCKS + "0.norm_context.weight"], w[BLOCKS + "0.norm_context.bias"])
        k, v = (latents @ w[BLOCKS + "0.fn.to_kv.weight"].T).chunk(2, dim=-1)
        q = layer_norm(hidden, w[BLOCKS + "0.norm.weight"], w[BLOCKS + "0.norm.bias"]) @ w[BLOCKS + "0.fn.to_q.weight"].T
        mixed = attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), dim_head**-0.5)
        x = hidden + merge_heads(mixed) @ w[BLOCKS + "0.fn.to_out.weight"].T
        # GEGLU feed-forward: net.0 projects to [a, g]; a * gelu(g) goes through net.2.
        h = layer_norm(x, w[BLOCKS + "1.norm.weight"], w[BLOCKS + "1.norm.bias"])
        a, g = (h @ w[BLOCKS + "1.fn.net.0.weight"].T + w[BLOCKS + "1.fn.net.0.bias"]).chunk(2, dim=-1)
        return x + (a * gelu(g)) @ w[BLOCKS + "1.fn.net.2.weight"].T + w[BLOCKS + "1.fn.net.2.bias"]
