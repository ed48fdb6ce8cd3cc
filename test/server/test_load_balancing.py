"""gRPC's own load balancing across replicas: two real servers on loopback behind one client
target, as a headless Kubernetes Service gives one name for all pods."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import start_tiny_server, stop_server
from grpc_helpers import cosine
from prometheus_client.parser import text_string_to_metric_families

from nvembed_triton.client import AsyncEmbeddingClient, EmbeddingClient
from nvembed_triton.protocol.contract import PUBLIC_MODEL

pytestmark = pytest.mark.server  # starts real tritonservers

TEXTS = ["one document about bread", "another about flour"]


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, tiny_checkpoint):
    servers = [start_tiny_server(tmp_path_factory.mktemp(f"replica-{i}"), tiny_checkpoint) for i in range(2)]
    yield servers
    for server in servers:
        stop_server(server)


def target(servers) -> str:
    return "ipv4:" + ",".join(server.url for server in servers)


def requests_served(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name == "nv_inference_request_success" and sample.labels.get("model") == PUBLIC_MODEL
    )


def test_requests_are_spread_over_both_replicas(two_servers):
    with EmbeddingClient(target(two_servers)) as client:
        expected = client.encode(TEXTS)
        for _ in range(6):  # until gRPC has connected to both
            client.encode(TEXTS)
        before = [requests_served(server) for server in two_servers]
        results = [client.encode(TEXTS) for _ in range(40)]
    served = [requests_served(server) - start for server, start in zip(two_servers, before, strict=True)]
    print(f"requests served per replica: {served}")
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in results)
    assert min(served) >= 10, served  # round robin: about 20 each (health probes add a few)


def test_the_async_client_balances_too(two_servers):
    import asyncio

    async def run():
        async with AsyncEmbeddingClient(target(two_servers)) as client:
            for _ in range(6):  # until gRPC has connected to both
                await client.encode(TEXTS)
            before = [requests_served(server) for server in two_servers]
            for _ in range(20):
                await client.encode(TEXTS)
            return before

    before = asyncio.run(run())
    served = [requests_served(server) - start for server, start in zip(two_servers, before, strict=True)]
    assert min(served) >= 5, served


def test_a_replica_that_stops_mid_run_is_skipped(tmp_path_factory, tiny_checkpoint):
    servers = [start_tiny_server(tmp_path_factory.mktemp(f"failover-{i}"), tiny_checkpoint) for i in range(2)]
    try:
        results, failures, stop = [], [], threading.Event()
        with EmbeddingClient(target(servers)) as client:
            expected = client.encode(TEXTS)

            def load():
                while not stop.is_set():
                    try:
                        results.append(client.encode(TEXTS))
                    except Exception as error:  # noqa: BLE001 - reported by the assert below
                        failures.append(error)

            worker = threading.Thread(target=load)
            worker.start()
            time.sleep(2)
            servers[0].process.send_signal(signal.SIGTERM)  # drains, then exits
            servers[0].process.wait(timeout=30)
            stopped_at = len(results)
            time.sleep(3)
            stop.set()
            worker.join(timeout=60)
        assert not failures, failures[:3]
        assert len(results) > stopped_at + 5, "requests did not go on after one replica stopped"
        assert all(np.all(cosine(r, expected) >= 0.99999) for r in results)
    finally:
        for server in servers:
            stop_server(server)
