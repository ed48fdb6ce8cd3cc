"""The CUDA-graph path's arithmetic, on the CPU: a pass widened to its bucket and run through the
capture-safe forward gives the eager pass's vectors. The capture itself needs a GPU and is checked
by bench/bench_gpu_server.py there (CI has none)."""

import numpy as np
import pytest
import torch
from nvembed_reference import ReferenceNVEmbed

from nvembed_triton.engine.cuda_graphs import (
    MAX_GRAPH_TOKENS,
    all_buckets,
    bucket_of,
    capture_or_none,
    padded_to_bucket,
    static_embed,
)
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.engine.nvembed_encoder import pad_right
from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.settings import EncoderSettings

TEXTS = ["How do neural networks learn?", "x", "Market prices are set by supply and demand. " * 12]


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return load_encoder(EncoderSettings.from_parameters({"model_dir": str(tiny_checkpoint), "device": "cpu"}))


def test_buckets_are_the_smallest_that_fit():
    assert bucket_of(1, 20) == (1, 32)
    assert bucket_of(1, 32) == (1, 32)
    assert bucket_of(3, 33) == (4, 64)
    assert bucket_of(64, 32) == (64, 32)
    assert bucket_of(65, 10) is None  # more rows than any bucket
    assert bucket_of(2, 2048) is None  # over MAX_GRAPH_TOKENS
    assert bucket_of(1, 2048) == (1, 2048)
    buckets = all_buckets()
    assert all(rows * length <= MAX_GRAPH_TOKENS for rows, length in buckets)
    assert buckets[0][0] * buckets[0][1] == MAX_GRAPH_TOKENS  # the pool is sized by the first capture


@pytest.mark.parametrize("instruction", ["", nvembed_query_instruction(RETRIEVAL_TASK)])
def test_a_pass_widened_to_its_bucket_gives_the_eager_vectors(encoder, tiny_checkpoint, instruction):
    tokenized = encoder.tokenizer.encode(TEXTS, [instruction] * len(TEXTS))
    input_ids, valid = pad_right([t.ids for t in tokenized])
    pool_from = torch.tensor([t.pool_from for t in tokenized])
    bucket = bucket_of(*input_ids.shape)
    assert bucket is not None and bucket != tuple(input_ids.shape)  # really widened: more rows and columns
    widened = static_embed(encoder.model, *padded_to_bucket(input_ids, valid, pool_from, bucket))[: len(TEXTS)].numpy()
    eager = encoder.embed_tokenized(tokenized)[0]
    reference = ReferenceNVEmbed(tiny_checkpoint)
    independent = np.stack([reference.embed(text, instruction) for text in TEXTS])
    assert np.isfinite(widened).all()
    assert np.abs(widened - eager).max() < 1e-5
    assert np.abs(widened - independent).max() < 1e-4


def test_pool_weights_cover_only_the_pooled_tokens():
    input_ids, valid = pad_right([[1, 5, 6, 2], [1, 7, 2]])
    ids, mask, weights = padded_to_bucket(input_ids, valid, torch.tensor([2, 1]), (4, 32))
    assert ids.shape == mask.shape == weights.shape == (4, 32)
    assert weights[0].nonzero().flatten().tolist() == [2, 3]
    assert weights[1].nonzero().flatten().tolist() == [1, 2]
    assert torch.equal(ids[2], ids[0]) and torch.equal(weights[3], weights[0])  # extra rows repeat the first
    assert not mask[:, 4:].any()


def test_no_graphs_on_a_cpu_or_when_turned_off(encoder):
    assert capture_or_none(encoder.model, torch.device("cpu"), enabled=True) is None
    assert encoder.graphs is None
    settings = EncoderSettings.from_parameters({"model_dir": "x", "device": "cpu", "cuda_graphs": "off"})
    assert settings.cuda_graphs is False
