import random

import pytest

from nvembed_triton.engine.batching import MIN_SPLIT_TOKENS, padded_tokens, plan_batches, split_for_workers


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


def test_a_pass_is_split_for_workers_only_into_parts_worth_running_apart():
    twenty_queries = [20] * 20  # 400 padded tokens
    plan = plan_batches(twenty_queries, 4096)
    assert len(plan) == 1
    halves = split_for_workers(plan, twenty_queries, workers=2)
    assert [len(part) for part in halves] == [10, 10]
    assert sorted(i for part in halves for i in part) == list(range(20))
    # 8 workers: four parts of 100 tokens; one more split would leave parts of 50, under MIN_SPLIT_TOKENS
    assert [len(part) for part in split_for_workers(plan, twenty_queries, workers=8)] == [5, 5, 5, 5]
    assert 50 < MIN_SPLIT_TOKENS <= 100
    four_queries = [18] * 4  # 72 tokens: halves of 36 would not pay for themselves
    assert split_for_workers(plan_batches(four_queries, 4096), four_queries, workers=2) == plan_batches(four_queries, 4096)
    assert split_for_workers([[0]], [5000], workers=4) == [[0]]  # one text is never split
    assert split_for_workers(plan, twenty_queries, workers=1) == plan


def test_splitting_keeps_each_part_in_length_order_and_splits_the_largest_first():
    lengths = [300, 290, 280, 270, 30, 30, 30, 30, 30, 30]
    plan = plan_batches(lengths, 2048)  # the four long ones, then the short ones
    parts = split_for_workers(plan, lengths, workers=3)
    assert parts == [[0, 1], [2, 3], [4, 5, 6, 7, 8, 9]]
