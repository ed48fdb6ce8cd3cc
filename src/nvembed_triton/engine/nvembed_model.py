"""NV-Embed-v2's forward pass without remote code: transformers' Mistral decoder made bidirectional,
the latent-attention pooling head, the masked mean and the L2 norm (docs/nv-embed-v2.md)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import MistralConfig, MistralModel
from transformers.utils import logging as transformers_logging

from nvembed_triton.engine.checkpoint import LatentAttentionSettings, read_json, weight_files

BACKBONE_PREFIX = "embedding_model."
HEAD_PREFIX = "latent_attention_model."
# The head's 8 x 4096-wide projections dominate memory on long inputs: run it on this many tokens at
# a time (tokens are independent in the head, so the result does not change).
HEAD_CHUNK_TOKENS = 8192
# Keys of `text_config` that describe the file rather than the network.
_NON_ARCHITECTURE_KEYS = {"model_type", "architectures", "_name_or_path", "torch_dtype", "dtype", "auto_map"}


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
    def __init__(self, backbone: MistralModel, head: LatentAttentionPooling):
        super().__init__()
        self.backbone = backbone
        self.head = head
        make_bidirectional(backbone)

    @property
    def dimension(self) -> int:
        return self.head.latents.shape[-1]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor) -> torch.Tensor:
        """input_ids, valid (bool): (B, L), right padded; pool_from: (B,). -> (B, D) unit FP32 vectors."""
        return self.pool(self.token_states(input_ids, valid), valid, pool_from)

    @torch.inference_mode()
    def token_states(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The bidirectional backbone's last hidden states, (B, L, hidden)."""
        # With padding: a (B, 1, 1, L) boolean mask, so every token sees every real token of its own
        # row and none of the padding (it broadcasts over query positions: B x L, not B x L x L).
        # Without padding (the planner makes most passes so, and every single long document): no
        # mask, which lets SDPA use its flash / memory-efficient kernels and native grouped-query
        # attention. make_bidirectional keeps both paths non-causal. No KV cache: nothing decodes.
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        return self.backbone(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def pool(self, hidden: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor) -> torch.Tensor:
        """The latent-attention head on the pooled tokens, their mean and the L2 norm: (B, D) FP32."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        pooled = valid & (positions[None, :] >= pool_from[:, None])
        # The head works token by token, so only the tokens that enter the mean go through it.
        rows = pooled.nonzero()[:, 0]
        head_out = torch.cat([self.head(chunk) for chunk in hidden[pooled].split(HEAD_CHUNK_TOKENS)])
        sums = torch.zeros(hidden.shape[0], head_out.shape[-1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, rows, head_out.float())
        means = sums / pooled.sum(dim=1, keepdim=True)
        return F.normalize(means, dim=-1)


def make_bidirectional(backbone: MistralModel) -> None:
    """NV-Embed removes Mistral's causal mask and sliding window. transformers decides causality per
    attention module and from the mask it is given; test_nvembed_model guards this against a
    from-scratch implementation, because these internals move between releases."""
    backbone.config.sliding_window = None
    backbone.config.use_cache = False
    for layer in backbone.layers:
        layer.self_attn.is_causal = False


def mistral_config(text_config: dict) -> MistralConfig:
    settings = {k: v for k, v in text_config.items() if k not in _NON_ARCHITECTURE_KEYS}
    config = MistralConfig(**settings)
    config.sliding_window = None  # the published model attends over the full sequence
    return config


def load_nvembed(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> NVEmbedModel:
    """Loads a snapshot straight onto `device` in `dtype`: no float32 copy of 7B parameters first."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    previous_verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the head's tensors are reported "unexpected" otherwise
    try:
        backbone = MistralModel.from_pretrained(
            model_dir,
            config=mistral_config(config["text_config"]),
            key_mapping={rf"^{BACKBONE_PREFIX}": ""},
            dtype=dtype,
            device_map=device,
            attn_implementation="sdpa",
        )
    finally:
        transformers_logging.set_verbosity(previous_verbosity)
    head = _load_head(model_dir, LatentAttentionSettings.from_config(config.get("latent_attention_config")), device, dtype)
    return NVEmbedModel(backbone.eval(), head)


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
