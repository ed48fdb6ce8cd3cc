"""Operating the server like TEI or a NIM: a bounded queue that refuses fast when full."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH, start_server, stop_server
from grpc_helpers import cosine, embed_documents, embed_query
from tritonclient.utils import InferenceServerException

from nvembed_triton.client import EmbeddingClient
from nvembed_triton.contract import PUBLIC_MODEL
from nvembed_triton.serve import REPOSITORY

QUEUE = 4
DOCUMENTS = [f"document {i} " + "bread flour yeast water salt " * 40 for i in range(64)]


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory, tiny_checkpoint):
    """The shipped repository with the public model's queue cut to QUEUE requests."""
    tmp = tmp_path_factory.mktemp("small-queue")
    repository = shutil.copytree(REPOSITORY, tmp / "repository", ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / PUBLIC_MODEL / "config.pbtxt"
    text, replaced = re.subn(r"max_queue_size: \d+", f"max_queue_size: {QUEUE}", config.read_text())
    assert replaced == 1
    config.write_text(text)
    server = start_server(
        tmp,
        PUBLIC_MODEL,
        ["--device", "cpu", "--model-repository", str(repository)],
        {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_MAX_LENGTH": str(TEST_MAX_LENGTH)},
    )
    yield server
    stop_server(server)


def test_a_burst_over_capacity_is_refused_fast_and_the_rest_is_served(small_queue_server):
    with small_queue_server.client() as client:
        expected = embed_documents(client, PUBLIC_MODEL, DOCUMENTS)

    def one(_):
        started = time.monotonic()
        with small_queue_server.client() as client:
            try:
                return embed_documents(client, PUBLIC_MODEL, DOCUMENTS), time.monotonic() - started
            except InferenceServerException as error:
                return error, time.monotonic() - started

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(one, range(64)))
    served = [result for result, _ in outcomes if isinstance(result, np.ndarray)]
    refused = [(error, seconds) for error, seconds in outcomes if isinstance(error, InferenceServerException)]
    reject_ms = sorted(seconds * 1e3 for _, seconds in refused)
    print(f"burst of 64 (16 instances + queue {QUEUE}): {len(served)} served, {len(refused)} refused; "
          f"time to refuse p50 {reject_ms[len(reject_ms) // 2]:.0f} ms, max {reject_ms[-1]:.0f} ms")  # fmt: skip
    assert len(served) + len(refused) == 64 and len(refused) >= 64 - 16 - QUEUE - 8
    assert all("UNAVAILABLE" in str(e.status()) and "maximum queue size" in e.message() for e, _ in refused)
    assert reject_ms[-1] < 1000
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in served)
    with small_queue_server.client() as client:
        assert embed_query(client, PUBLIC_MODEL, "healthy afterwards").shape[0] == 1


def test_the_python_client_rides_out_a_full_queue(small_queue_server):
    """Its retries with backoff turn refusals into later successes."""
    with EmbeddingClient(small_queue_server.url, max_concurrency=32) as client:
        expected = client.encode(DOCUMENTS[:8])
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: client.encode(DOCUMENTS[:8]), range(64)))
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in results)
