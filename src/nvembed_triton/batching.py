"""Planning forward passes by a token budget: sequences are sorted by length so each pass pads
only to its own longest member, and a long document never drags many others along with it."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into passes of at most `max_batch_tokens` padded tokens
    (rows x longest row). Longest first; a sequence longer than the budget gets a pass alone."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        # Sorted descending: the first member of the current batch is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded_tokens(lengths: Sequence[int], batches: list[list[int]]) -> int:
    """Tokens a plan computes, padding included (for benchmarks and tests)."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
