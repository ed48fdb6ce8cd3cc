"""NV-Embed-v2's forward pass without remote code: the bidirectional Mistral backbone with fused
projections (fused_mistral.py), the latent-attention pooling head, the masked mean and the L2 norm
(docs/nv-embed-v2.md), over padded rows or a packed stream of texts (packing.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from nvembed_triton.engine.checkpoint import LatentAttentionSettings, read_json, weight_files
from nvembed_triton.engine.fused_mistral import Attention, FusedMistral, load_fused_mistral
from nvembed_triton.engine.packing import PackedPass

HEAD_PREFIX = "latent_attention_model."
# The head's 8 x 4096-wide projections dominate memory on long inputs: run it on this many tokens at
# a time (tokens are independent in the head, so the result does not change).
HEAD_CHUNK_TOKENS = 8192


class _CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)


class _CrossAttentionBlock(nn.Module):
    def __init__(self, settings: LatentAttentionSettings):
        super().__init__()
        self.norm = nn.LayerNorm(settings.latent_dim)
        self.norm_context = nn.LayerNorm(settings.hidden_dim)
        self.fn = _CrossAttention(settings.latent_dim, settings.hidden_dim, settings.num_cross_heads, settings.cross_dim_head)


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)  # exact (erf) gelu, as published


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))


class _FeedForwardBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = _FeedForward(dim)


class LatentAttentionPooling(nn.Module):
    """Token hidden states are the queries; the learned latents give keys and values. Parameter
    names follow the published checkpoint so its tensors load by name."""

    def __init__(self, settings: LatentAttentionSettings):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(settings.num_latents_value, settings.latent_dim))
        self.cross_attend_blocks = nn.ModuleList([_CrossAttentionBlock(settings), _FeedForwardBlock(settings.latent_dim)])
        self.latent_keys: torch.Tensor | None = None
        self.latent_values: torch.Tensor | None = None

    @torch.inference_mode()
    def precompute_latent_keys_values(self) -> None:
        """The latents' keys and values do not depend on the input: compute them once at load."""
        block = self.cross_attend_blocks[0]
        keys, values = block.fn.to_kv(block.norm_context(self.latents)).chunk(2, dim=-1)
        heads, dim_head = block.fn.heads, block.fn.dim_head
        # (latents, heads * dim_head) -> (heads, latents, dim_head): heads are the outer split.
        self.latent_keys = keys.view(-1, heads, dim_head).transpose(0, 1).contiguous()
        self.latent_values = values.view(-1, heads, dim_head).transpose(0, 1).contiguous()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, hidden) token states -> (T, hidden) pooled-space states."""
        attention, feed_forward = self.cross_attend_blocks
        heads, dim_head = attention.fn.heads, attention.fn.dim_head
        queries = attention.fn.to_q(attention.norm(tokens)).view(-1, heads, dim_head).transpose(0, 1)
        # No mask: every token attends to all latents; SDPA's default scale is dim_head ** -0.5.
        attended = F.scaled_dot_product_attention(queries, self.latent_keys, self.latent_values)
        x = tokens + attention.fn.to_out(attended.transpose(0, 1).reshape(-1, heads * dim_head))
        return x + feed_forward.fn.net(feed_forward.norm(x))


class NVEmbedModel(nn.Module):
    def __init__(self, backbone: FusedMistral, head: LatentAttentionPooling):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def dimension(self) -> int:
        return self.head.latents.shape[-1]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor) -> torch.Tensor:
        """input_ids, valid (bool): (B, L), right padded; pool_from: (B,). -> (B, D) unit FP32 vectors."""
        return self.pool(self.token_states(input_ids, valid), valid, pool_from)

    @torch.inference_mode()
    def token_states(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The bidirectional backbone's last hidden states over padded rows, (B, L, hidden). Without
        padding (the planner makes many passes so, and every single long document) no mask, which
        lets SDPA use its flash and memory-efficient kernels. No KV cache: nothing decodes."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        return self.backbone(input_ids, positions, Attention.padded(valid, masked=not bool(valid.all())))

    @torch.inference_mode()
    def pool(self, hidden: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor) -> torch.Tensor:
        """The latent-attention head on the pooled tokens, their mean and the L2 norm: (B, D) FP32."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        pooled = valid & (positions[None, :] >= pool_from[:, None])
        return self.mean_of_head(hidden[pooled], pooled.nonzero()[:, 0], hidden.shape[0])

    @torch.inference_mode()
    def embed_packed(self, packed: PackedPass) -> torch.Tensor:
        """A packed stream of texts (on this model's device) -> (N, D) unit FP32 vectors."""
        hidden = self.backbone(packed.input_ids, packed.positions, Attention.packed(packed.starts, packed.longest))
        return self.mean_of_head(hidden[packed.pooled], packed.pooled_text, packed.texts)

    def mean_of_head(self, tokens: torch.Tensor, owners: torch.Tensor, texts: int) -> torch.Tensor:
        """The head works token by token, so only the tokens that enter the means go through it:
        `tokens` (P, hidden) of texts `owners` (P,) -> the L2-normalised mean of each text, (texts, D)."""
        head_out = torch.cat([self.head(chunk) for chunk in tokens.split(HEAD_CHUNK_TOKENS)])
        sums = torch.zeros(texts, head_out.shape[-1], dtype=torch.float32, device=tokens.device)
        sums.index_add_(0, owners, head_out.float())
        counts = torch.bincount(owners, minlength=texts)  # a text with none would give NaN, refused upstream
        return F.normalize(sums / counts[:, None], dim=-1)


def load_nvembed(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> NVEmbedModel:
    """Loads a snapshot straight onto `device` in `dtype`: no float32 copy of 7B parameters first."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    backbone = load_fused_mistral(model_dir, config["text_config"], device, dtype)
    head = _load_head(model_dir, LatentAttentionSettings.from_config(config.get("latent_attention_config")), device, dtype)
    return NVEmbedModel(backbone, head)


def _load_head(
    model_dir: Path, settings: LatentAttentionSettings, device: torch.device, dtype: torch.dtype
) -> LatentAttentionPooling:
    with torch.device("meta"):
        head = LatentAttentionPooling(settings)
    state = {}
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt", device=str(device)) as shard:
            for name in shard.keys():
                if name.startswith(HEAD_PREFIX):
                    state[name[len(HEAD_PREFIX) :]] = shard.get_tensor(name).to(dtype)
    head.load_state_dict(state, strict=True, assign=True)
    head.eval().precompute_latent_keys_values()
    return head
