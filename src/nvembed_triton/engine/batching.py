"""Planning forward passes by a token budget: sequences are sorted by length so each pass pads
only to its own longest member, and a long document never drags many others along with it."""

from __future__ import annotations

from collections.abc import Sequence

# A sequence joins a pass only if that pads it by at most this fraction of the pass's longest
# member, or by at most PADDING_SLACK_TOKENS (short texts of similar length always share passes).
# A pass costs about as much per padded token as per real one, and extra passes are cheap next to
# large batches' compute, so bounding the padding beats filling every pass to the budget.
MAX_PADDING_FRACTION = 0.25
PADDING_SLACK_TOKENS = 32


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into passes of at most `max_batch_tokens` padded tokens
    (rows x longest row). Longest first; a sequence longer than the budget gets a pass alone."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        if batches and _fits(batches[-1], lengths, lengths[index], max_batch_tokens):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _fits(batch: list[int], lengths: Sequence[int], length: int, max_batch_tokens: int) -> bool:
    longest = lengths[batch[0]]  # sorted descending: the first member is the longest
    padding = longest - length
    within_budget = (len(batch) + 1) * longest <= max_batch_tokens
    return within_budget and (padding <= PADDING_SLACK_TOKENS or padding <= MAX_PADDING_FRACTION * longest)


def padded_tokens(lengths: Sequence[int], batches: list[list[int]]) -> int:
    """Tokens a plan computes, padding included (for benchmarks and tests)."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


# A pass is split for parallel CPU workers only into parts of at least this many padded tokens:
# smaller parts lose more to each pass's fixed cost than running side by side gains (measured on
# short queries in-process and through the server: bench/RESULTS.md, "Second round").
MIN_SPLIT_TOKENS = 64


def split_for_workers(batches: list[list[int]], lengths: Sequence[int], workers: int) -> list[list[int]]:
    """`batches` (from plan_batches) with the largest pass halved until there are `workers` passes
    or a half would have fewer than MIN_SPLIT_TOKENS padded tokens; each half keeps the length order."""
    batches = [list(batch) for batch in batches]
    while len(batches) < workers:
        largest = max(range(len(batches)), key=lambda b: padded_tokens(lengths, [batches[b]]), default=None)
        if largest is None or len(batches[largest]) < 2:
            break
        batch = batches[largest]
        half = len(batch) // 2
        if padded_tokens(lengths, [batch[half:]]) < MIN_SPLIT_TOKENS:
            break
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches
