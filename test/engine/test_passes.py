"""passes.PassRunner: planned passes side by side on a CPU, with the real encoders' results unchanged."""

import threading
import time

import numpy as np
import pytest
import torch
from grpc_helpers import cosine
from sentence_transformers import SentenceTransformer
from texts import DOCUMENTS

from nvembed_triton.engine.nvembed_encoder import NVEmbedEncoder
from nvembed_triton.engine.passes import MIN_THREADED_PASS_TOKENS, PassRunner, workers_for
from nvembed_triton.engine.st_encoder import SentenceTransformerEncoder
from nvembed_triton.launcher.serve import demo_model_dir
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

LENGTHS = [40] * 32  # 1280 padded tokens: split in two for 2 workers


def test_workers_follow_the_device():
    assert workers_for("cpu") == torch.get_num_threads()
    assert workers_for("cuda:0") == 1


def test_parallel_passes_run_on_their_own_threads_with_one_intra_op_thread_each():
    runner, seen = PassRunner(workers=2), []
    both_started = threading.Barrier(2, timeout=30)  # broken (an error) unless the two passes overlap

    def compute(batch):
        both_started.wait()
        seen.append((threading.current_thread().name, torch.get_num_threads(), sorted(batch)))

    passes, padded = runner.run(list(range(32)), LENGTHS, 4096, compute)
    assert (passes, padded) == (2, 1280)
    assert all(name.startswith("pass") and threads == 1 for name, threads, _ in seen)
    assert sorted(i for *_, batch in seen for i in batch) == list(range(32))
    assert torch.get_num_threads() >= 1  # the caller's own setting is untouched by the pool's


def test_a_large_lone_pass_runs_on_the_calling_thread_with_its_intra_op_threads():
    seen = []
    one_text = [MIN_THREADED_PASS_TOKENS]  # a pass that cannot be split
    PassRunner(workers=2).run([0], one_text, 4096, lambda _: seen.append((threading.current_thread(), torch.get_num_threads())))
    assert seen == [(threading.current_thread(), torch.get_num_threads())]


@pytest.mark.parametrize("lengths", [[12], [20] * 3, [MIN_THREADED_PASS_TOKENS - 1]])
def test_a_small_lone_pass_runs_on_a_pass_thread_with_one_intra_op_thread(lengths):
    seen = []

    def compute(batch):
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    passes, _ = PassRunner(workers=2).run(list(range(len(lengths))), lengths, 4096, compute)
    assert passes == 1 and len(seen) == 1
    assert seen[0][0].startswith("pass") and seen[0][1] == 1


def test_keep_is_asked_on_the_calling_thread_before_each_pass_and_dropped_rows_are_not_computed():
    asked_from, computed = set(), []

    def keep(batch):
        asked_from.add(threading.current_thread())
        return [i for i in batch if i % 2 == 0]

    PassRunner(workers=2).run(list(range(32)), LENGTHS, 4096, computed.extend, keep)
    assert asked_from == {threading.current_thread()}
    assert sorted(computed) == list(range(0, 32, 2))


def test_an_error_is_raised_once_the_other_running_pass_has_ended():
    finished = threading.Event()
    both_started = threading.Barrier(2, timeout=30)

    def compute(batch):
        both_started.wait()
        if 0 in batch:
            raise RuntimeError("out of memory")
        time.sleep(0.2)
        finished.set()

    with pytest.raises(RuntimeError, match="out of memory"):
        PassRunner(workers=2).run(list(range(32)), LENGTHS, 4096, compute)
    assert finished.is_set()  # nothing still writes into the caller's result


def test_sentence_transformers_in_parallel_passes_equals_the_library(tmp_path):
    """Many encode calls with 2 passes at once (the library's tokenizer shared by both threads),
    against sentence-transformers' own encode of each text."""
    settings = EncoderSettings(str(demo_model_dir()), "cpu", "float32", 256, 4096)
    encoder = SentenceTransformerEncoder(settings)
    encoder.passes = PassRunner(workers=2)
    reference = SentenceTransformer(str(demo_model_dir()), device="cpu")
    texts = [f"{DOCUMENTS[i % len(DOCUMENTS)]} " * (1 + i % 5) for i in range(48)]
    expected = reference.encode(texts, normalize_embeddings=True, batch_size=1)
    for _ in range(10):
        result = encoder.encode(texts, TextOptions.each(len(texts)))
        assert result.passes >= 2
        assert np.all(cosine(result.embeddings, expected) >= 0.99999)


def test_nvembed_in_parallel_passes_equals_one_pass_at_a_time(tiny_checkpoint):
    settings = EncoderSettings(str(tiny_checkpoint), "cpu", "float32", 4096, 4096)
    encoder = NVEmbedEncoder(settings)
    texts = [f"{DOCUMENTS[i % len(DOCUMENTS)]} " * (1 + i % 7) for i in range(40)]
    encoder.passes = PassRunner(workers=1)
    serial = encoder.encode(texts, TextOptions.each(len(texts)))
    encoder.passes = PassRunner(workers=2)
    parallel = encoder.encode(texts, TextOptions.each(len(texts)))
    assert parallel.passes >= 2  # the passes ran side by side
    np.testing.assert_allclose(parallel.embeddings, serial.embeddings, atol=1e-5)
