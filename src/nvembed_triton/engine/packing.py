"""Packed passes: a pass's texts end to end in one stream of tokens, no padding, each text attending
only to itself (fused_mistral.Attention.packed) and the pooling head over the pooled tokens only.
Planned by a token budget of real tokens (plan_packed): with no padding to bound, passes are filled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedPass:
    input_ids: torch.Tensor  # (T,) the texts' tokens end to end
    positions: torch.Tensor  # (T,) each token's position within its own text
    starts: torch.Tensor  # (N + 1,) int32: each text's first token, then T
    longest: int  # the longest text's tokens
    pooled: torch.Tensor  # (P,) stream indices of the tokens that enter the means (after each instruction)
    pooled_text: torch.Tensor  # (P,) which text each of them belongs to

    @property
    def texts(self) -> int:
        return self.starts.shape[0] - 1

    def to(self, device: torch.device) -> PackedPass:
        """On `device` (the starts too: varlen attention reads them there)."""
        move = {name: getattr(self, name).to(device, non_blocking=True)
                for name in ("input_ids", "positions", "starts", "pooled", "pooled_text")}  # fmt: skip
        return PackedPass(longest=self.longest, **move)


def pack(token_ids: Sequence[Sequence[int]], pool_from: Sequence[int]) -> PackedPass:
    """Texts' token ids (each pooled from its pool_from position on) as one packed pass, on the host."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    starts = torch.zeros(len(token_ids) + 1, dtype=torch.long)
    starts[1:] = lengths.cumsum(0)
    text_of = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    positions = torch.arange(int(starts[-1])) - starts[:-1][text_of]
    pooled = (positions >= torch.tensor(pool_from, dtype=torch.long)[text_of]).nonzero()[:, 0]
    return PackedPass(
        input_ids=torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids in token_ids]),
        positions=positions, starts=starts.to(torch.int32), longest=int(lengths.max()),
        pooled=pooled, pooled_text=text_of[pooled],
    )  # fmt: skip


def plan_packed(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths` in passes of at most `max_batch_tokens` real tokens, longest first (so
    passes of similar texts run together); a text longer than the budget gets a pass alone."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    passes: list[list[int]] = []
    filled = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        if passes and filled + lengths[index] <= max_batch_tokens:
            passes[-1].append(index)
            filled += lengths[index]
        else:
            passes.append([index])
            filled = lengths[index]
    return passes
