import random

import pytest

from nvembed_triton.batching import padded_tokens, plan_batches


def test_every_index_is_planned_exactly_once():
    lengths = [random.Random(seed).randint(1, 3000) for seed in range(200)]
    batches = plan_batches(lengths, 8192)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))


def test_batches_respect_the_token_budget():
    lengths = [random.Random(seed).randint(1, 2048) for seed in range(300)]
    for batch in plan_batches(lengths, 4096):
        assert len(batch) * max(lengths[i] for i in batch) <= 4096


def test_a_sequence_over_the_budget_runs_alone():
    lengths = [32768, 10, 10, 10]
    batches = plan_batches(lengths, 16384)
    assert batches[0] == [0]
    assert sorted(batches[1]) == [1, 2, 3]


def test_mixed_lengths_are_not_padded_to_the_longest():
    lengths = [2048] + [16] * 63
    batches = plan_batches(lengths, 4096)
    assert padded_tokens(lengths, batches) == 2048 + 63 * 16
    assert padded_tokens(lengths, [list(range(64))]) == 64 * 2048  # what padding to the longest costs


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], 0)


def test_padding_per_sequence_is_bounded():
    lengths = [random.Random(seed).randint(16, 2048) for seed in range(500)]
    for batch in plan_batches(lengths, 16384):
        longest = max(lengths[i] for i in batch)
        assert all(longest - lengths[i] <= max(32, 0.25 * longest) for i in batch)


def test_similar_short_texts_share_one_pass():
    assert len(plan_batches([20, 12, 30, 25] * 16, 16384)) == 1
