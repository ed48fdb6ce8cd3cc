"""NV-Embed-v2's backbone, Mistral's decoder layers made bidirectional, written out so that each layer
runs q/k/v as one matmul and gate/up as another: their weights are concatenated once at load from the
checkpoint's separate tensors (the files are unchanged, and no unfused copy stays in memory).

A pass runs in one of two layouts, the same layers for both:
- padded rows, (B, L) token ids with a key mask: what CUDA graphs capture (cuda_graphs.py);
- a packed stream, the pass's texts end to end as T tokens with no padding, each text attending
  only to itself (Attention.packed): varlen flash attention on a GPU, one SDPA call per text on a CPU.
The dense parts of a layer (RMSNorm, the fused projections, rotary, SwiGLU, the residual adds) are
two plain functions, so torch.compile can fuse each once for every layer (compiled.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from nvembed_triton.engine.checkpoint import WEIGHTS_INDEX, read_weight_map, weight_files

BACKBONE_PREFIX = "embedding_model."
# A layer's attention over a stream of T tokens: q (T, heads, head_dim), k and v (T, kv_heads, head_dim)
# -> (T, heads * head_dim).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MistralShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    vocab: int

    @classmethod
    def from_text_config(cls, config: dict) -> MistralShape:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            hidden=hidden, intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]),
            heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)), max_positions=int(config.get("max_position_embeddings", 32768)),
            vocab=int(config["vocab_size"]),
        )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Mistral's RMSNorm: in float32, then back to the input's dtype before the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., heads, head_dim); cos and sin (..., head_dim) are its tokens'."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


Project = Callable[[torch.Tensor], torch.Tensor]  # a linear layer: nn.Linear, a packed one, or F.linear with a weight


def attention_inputs(
    x: torch.Tensor, norm: torch.Tensor, qkv: Project, cos: torch.Tensor, sin: torch.Tensor, shape: MistralShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's first dense part: RMSNorm, the fused q/k/v matmul, rotary. x (..., hidden)."""
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    q, k, v = qkv(rms_norm(x, norm, shape.rms_norm_eps)).split((q_size, kv_size, kv_size), dim=-1)
    lead = x.shape[:-1]
    q = rotate(q.reshape(*lead, shape.heads, shape.head_dim), cos, sin)
    k = rotate(k.reshape(*lead, shape.kv_heads, shape.head_dim), cos, sin)
    return q, k, v.reshape(*lead, shape.kv_heads, shape.head_dim)


def after_attention(
    x: torch.Tensor, attended: torch.Tensor, out: Project, norm: torch.Tensor, gate_up: Project, down: Project,
    shape: MistralShape,
) -> torch.Tensor:  # fmt: skip
    """A layer's second dense part: the output projection and residual, RMSNorm, the fused gate/up
    matmul, SwiGLU, the down projection and residual."""
    x = x + out(attended)
    gate, up = gate_up(rms_norm(x, norm, shape.rms_norm_eps)).chunk(2, dim=-1)
    return x + down(F.silu(gate) * up)


class FusedLayer(nn.Module):
    def __init__(self, shape: MistralShape):
        super().__init__()
        qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
        self.input_norm = nn.Parameter(torch.empty(shape.hidden))
        self.qkv = nn.Linear(shape.hidden, qkv_out, bias=False)
        self.out = nn.Linear(shape.heads * shape.head_dim, shape.hidden, bias=False)
        self.post_norm = nn.Parameter(torch.empty(shape.hidden))
        self.gate_up = nn.Linear(shape.hidden, 2 * shape.intermediate, bias=False)
        self.down = nn.Linear(shape.intermediate, shape.hidden, bias=False)


class Rotary:
    """cos and sin of every position up to max_positions, computed once in float32 (as transformers
    computes them per call) and kept in the model's dtype."""

    def __init__(self, shape: MistralShape, device: torch.device, dtype: torch.dtype):
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.int64, device=device).float()
                                                / shape.head_dim))  # fmt: skip
        freqs = torch.arange(shape.max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


class DenseParts:
    """A layer's two dense parts as forward() calls them: eagerly, through each layer's own linear
    modules (nn.Linear, or the CPU's packed oneDNN layers). compiled.py makes a compiled kind."""

    def __init__(self, shape: MistralShape):
        self.shape = shape

    def before(self, layer: FusedLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return attention_inputs(x, layer.input_norm, layer.qkv, cos, sin, self.shape)

    def after(self, layer: FusedLayer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return after_attention(x, attended, layer.out, layer.post_norm, layer.gate_up, layer.down, self.shape)


class FusedMistral(nn.Module):
    def __init__(self, shape: MistralShape):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(FusedLayer(shape) for _ in range(shape.layers))
        self.norm = nn.Parameter(torch.empty(shape.hidden))
        self.rotary: Rotary | None = None  # made once the weights are on their device
        self.dense = DenseParts(shape)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Last hidden states, (..., hidden), for token ids and their positions of any leading shape:
        (B, L) padded rows or (T,) a packed stream. The layers see every layout as a stream of tokens
        (T, hidden): one compiled graph serves both, and only `attend` knows the rows."""
        x = self.embed_tokens(input_ids.reshape(-1))
        cos, sin = self.rotary.at(positions.reshape(-1))
        for layer in self.layers:
            q, k, v = self.dense.before(layer, x, cos, sin)
            x = self.dense.after(layer, x, attend(q, k, v))
        return rms_norm(x, self.norm, self.shape.rms_norm_eps).reshape(*input_ids.shape, -1)


class Attention:
    """The two layouts' attention, bidirectional (NV-Embed removes Mistral's causal mask and sliding window)."""

    @staticmethod
    def padded(valid: torch.Tensor, masked: bool = True) -> Attend:
        """Rows (B, L) of a stream of B x L tokens, with `valid` (B, L) as the key mask; masked=False
        when no row is padded (then SDPA may use its flash and memory-efficient kernels)."""
        rows, length = valid.shape
        mask = valid[:, None, None, :] if masked else None

        def attend(q, k, v):
            rowed = [t.view(rows, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]  # (B, heads, L, dim)
            out = F.scaled_dot_product_attention(*rowed, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2).reshape(rows * length, -1)

        return attend

    @staticmethod
    def packed(starts: torch.Tensor, longest: int) -> Attend:
        """A stream of texts end to end: `starts` (N + 1,) int32, each text's first token and the
        stream's end (on the stream's device); `longest` the longest text. Varlen flash attention on a
        GPU; on a CPU, which has none, SDPA over each text in turn."""

        def attend(q, k, v):
            if q.is_cuda:
                from torch.nn.attention.varlen import varlen_attn

                return varlen_attn(q, k, v, starts, starts, longest, longest, enable_gqa=True).reshape(q.shape[0], -1)
            bounds = starts.tolist()
            outs = []
            for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
                piece = [t[begin:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, length, head_dim)
                outs.append(F.scaled_dot_product_attention(*piece, enable_gqa=True)[0].transpose(0, 1))
            return torch.cat(outs).reshape(q.shape[0], -1)

        return attend


@torch.inference_mode()
def load_fused_mistral(model_dir: str | Path, text_config: dict, device: torch.device, dtype: torch.dtype) -> FusedMistral:
    """The backbone straight onto `device` in `dtype`, each layer's q/k/v and gate/up concatenated as
    they are read: memory peaks one layer's projections above the model's, never two copies."""
    model_dir = Path(model_dir)
    shape = MistralShape.from_text_config(text_config)
    with torch.device("meta"):
        model = FusedMistral(shape)
    index = model_dir / WEIGHTS_INDEX
    files = {name: model_dir / file for name, file in read_weight_map(index).items()} if index.is_file() else None
    handles = {path: safe_open(path, framework="pt", device=str(device)) for path in weight_files(model_dir)}

    def tensor(name: str) -> torch.Tensor:
        full = BACKBONE_PREFIX + name
        path = files[full] if files is not None else next(iter(handles))
        return handles[path].get_tensor(full).to(dtype)

    def assign(module: nn.Module, attribute: str, value: torch.Tensor) -> None:
        setattr(module, attribute, nn.Parameter(value, requires_grad=False))

    assign(model.embed_tokens, "weight", tensor("embed_tokens.weight"))
    assign(model, "norm", tensor("norm.weight"))
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        assign(layer, "input_norm", tensor(prefix + "input_layernorm.weight"))
        assign(layer, "post_norm", tensor(prefix + "post_attention_layernorm.weight"))
        assign(layer.qkv, "weight", torch.cat([tensor(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv"]))
        assign(layer.out, "weight", tensor(prefix + "self_attn.o_proj.weight"))
        assign(layer.gate_up, "weight", torch.cat([tensor(f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up")]))
        assign(layer.down, "weight", tensor(prefix + "mlp.down_proj.weight"))
    model.rotary = Rotary(shape, device, dtype)
    return model.eval()
