"""Isolation under concurrency through the real server: many clients at once, each with different
texts; every embedding equals the same text embedded alone, in order, to the right client, each
public instance held many of them at once, and the encoder really did batch requests together."""

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEST_ADMIN_KEY
from grpc_helpers import bytes_input, cosine, embed_documents, embed_query, infer

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL, encoder_model_name
from nvembed_triton.serving.metrics import EXECUTING_METRIC
from nvembed_triton.serving.server import ADMIN_KEY_GRPC_HEADER
from nvembed_triton.serving.supervisor import Timings, scrape

pytestmark = pytest.mark.server  # starts real tritonservers

ENCODER = encoder_model_name(PUBLIC_MODEL)
CLIENTS = 24
REQUESTS_PER_CLIENT = 6
MATCH = 0.9999
WORDS = "alpha beta gamma delta neural market cookie flour network learn price supply weight".split()


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"text {seed}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 120))) for i in range(count)]


def encoder_counts(client):
    statistics = client.get_inference_statistics(ENCODER, as_json=True, headers={ADMIN_KEY_GRPC_HEADER: TEST_ADMIN_KEY})
    stats = statistics["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def most_held(metrics_url: str, stop: threading.Event, seen: list[float]) -> None:
    """The public model's executing gauge (requests its instances hold), read until stopped."""
    while not stop.wait(0.05):
        seen.append(scrape(metrics_url, {EXECUTING_METRIC}).get((EXECUTING_METRIC, PUBLIC_MODEL), 0.0))


def test_concurrent_clients_get_their_own_embeddings_in_order(nvembed_server):
    texts = make_texts(60, seed=1)
    with nvembed_server.client() as client:
        alone_document = {t: embed_documents(client, PUBLIC_MODEL, [t])[0] for t in texts}
        alone_query = {t: embed_query(client, PUBLIC_MODEL, t)[0] for t in texts[:20]}
        inferences_before, executions_before = encoder_counts(client)
        config = client.get_model_config(PUBLIC_MODEL, as_json=True)["config"]
    instances = sum(int(group["count"]) for group in config["instance_group"])
    started = time.monotonic()

    def one_client(client_id: int):
        rng = random.Random(client_id)
        outcomes = []
        with nvembed_server.client() as client:
            for _ in range(REQUESTS_PER_CLIENT):
                if rng.random() < 0.4:
                    text = rng.choice(list(alone_query))
                    outcomes.append(("query", [text], embed_query(client, PUBLIC_MODEL, text)))
                else:
                    chosen = rng.sample(texts, rng.randint(1, 12))
                    outcomes.append(("documents", chosen, embed_documents(client, PUBLIC_MODEL, chosen)))
        return outcomes

    stop, held = threading.Event(), []
    watcher = threading.Thread(target=most_held, args=(f"http://127.0.0.1:{nvembed_server.metrics_port}/metrics", stop, held))
    watcher.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one_client, range(CLIENTS)))
    stop.set()
    watcher.join()

    for outcomes in results:
        for kind, sent, embeddings in outcomes:
            assert embeddings.shape == (len(sent), 64)
            expected = np.stack([(alone_query if kind == "query" else alone_document)[t] for t in sent])
            assert np.all(cosine(embeddings, expected) >= MATCH), (kind, sent)

    with nvembed_server.client() as client:
        inferences, executions = encoder_counts(client)
    requests = CLIENTS * REQUESTS_PER_CLIENT
    # serve.sh's health probe sends one query every health_interval_s during the test as well.
    probes = math.ceil((time.monotonic() - started) / Timings.health_interval_s) + 1
    assert requests <= inferences - inferences_before <= requests + probes
    assert executions - executions_before < requests, "concurrent requests were never batched together"
    # More requests in flight than the public model has processes: each instance holds several.
    assert max(held) > instances, (instances, held)


def test_batch_dimension_interface_of_the_encoder(nvembed_server):
    """Clients that can send a batch dimension call the encoder directly: text [B, N]."""
    texts = make_texts(6, seed=2)
    rows = [texts[:3], texts[3:]]
    inputs = [
        bytes_input(contract.TEXT_INPUT, rows, [2, 3]),
        bytes_input(contract.PROMPT_NAME_INPUT, [["query"], ["document"]], [2, 1]),
    ]
    with nvembed_server.client() as client:
        batched = infer(client, ENCODER, inputs)
        assert batched.shape == (2, 3, 64)
        queries = np.stack([embed_query(client, PUBLIC_MODEL, t)[0] for t in rows[0]])
        documents = embed_documents(client, PUBLIC_MODEL, rows[1])
    assert np.all(cosine(batched[0], queries) >= MATCH)
    assert np.all(cosine(batched[1], documents) >= MATCH)
