"""FP8 (e4m3) matmuls for the backbone's linear layers, opt-in (setting fp8): each weight is
quantised once at load with one scale per output channel, each input per token as it arrives, and
torch._scaled_mm multiplies them into the model's dtype. The pooling head stays in fp16/bf16.

Each GEMM group quantises its input once: the fused q/k/v and gate/up projections read one
quantised copy of their normed input. With compile on, Inductor fuses that quantisation (the
per-token amax, the scale, the cast) into the kernel that makes the input (the RMSNorm, the SwiGLU
product); eagerly it is a few small kernels per projection.

Its fidelity on a trained NV-Embed-v2 cannot be judged on random weights: fp8_check.py measures it
on an operator's own weights and texts."""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_FLOOR = 1e-12  # a row of zeros still gets a finite scale


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, k) -> (e4m3 values, float32 scales (rows, 1)) with x ~ values * scales."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., k) @ W^T for W quantised as `weight` (n, k) e4m3 with `scale` (1, n): per-token scales for x."""
    rows = x.reshape(-1, x.shape[-1])
    values, row_scale = quantise_rows(rows)
    out = torch._scaled_mm(values, weight.t(), scale_a=row_scale, scale_b=scale, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        values, scale = quantise_rows(linear.weight.detach())
        self.register_buffer("weight", values)  # (out, in) e4m3: a scale per output channel
        self.register_buffer("scale", scale.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale)


@torch.inference_mode()
def quantise_backbone(backbone: nn.Module) -> int:
    """Every linear layer of the backbone's decoder layers as Fp8Linear (the embedding table and the
    norms stay); each fp16 weight is freed as its FP8 copy replaces it. Returns how many."""
    count = 0
    for layer in backbone.layers:
        for name in ("qkv", "out", "gate_up", "down"):
            setattr(layer, name, Fp8Linear(getattr(layer, name)))
            count += 1
    return count
