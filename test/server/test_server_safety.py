"""Attacks and faults through real servers: remote model control, oversized requests, killed stub
processes under load, SIGTERM with requests in flight. Each gets a clear refusal or a recovery,
and the server answers correctly afterwards."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH, start_tiny_server, stop_server
from grpc_helpers import bytes_input, cosine, embed_documents, embed_query, infer
from server_processes import http, memory_mb, scrape_metrics, tritonserver_pid, wait_for_api
from tritonclient.utils import InferenceServerException

from nvembed_triton.client import EmbeddingClient
from nvembed_triton.launcher.serve import closed_flag
from nvembed_triton.launcher.server import CLOSED_HEADER, stubs_of
from nvembed_triton.model.metrics import EXECUTING_METRIC
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL

pytestmark = pytest.mark.server  # starts real tritonservers

TEXTS = ["a first document about flour", "a second one about bread", "the third is about yeast"]
RECOVERY_LIMIT_S = 60.0


# --- no remote model control ---------------------------------------------------------------------

EVIL_MODEL_PY = b"""
import pathlib
pathlib.Path("{marker}").write_text("uploaded code ran")
class TritonPythonModel:
    def execute(self, requests):
        return []
"""


def test_clients_cannot_unload_or_load_models_over_http(nvembed_server, tmp_path):
    """Two locks: the repository API is closed to every client, and model control is off, so nothing
    can be loaded or unloaded."""
    marker = tmp_path / "marker"
    headers, refusal = {}, CLOSED_HEADER
    status, body = http(nvembed_server, "POST", f"/v2/repository/models/{PUBLIC_MODEL}/unload", headers=headers)
    assert status >= 400 and refusal in body
    upload = {
        "parameters": {
            "config": json.dumps({"backend": "python", "max_batch_size": 0}),
            "file:1/model.py": base64.b64encode(EVIL_MODEL_PY.replace(b"{marker}", str(marker).encode())).decode(),
        }
    }
    status, body = http(nvembed_server, "POST", "/v2/repository/models/evil/load", upload, headers=headers)
    assert status >= 400 and refusal in body
    time.sleep(1)
    assert not marker.exists()
    with nvembed_server.client() as client:
        assert client.is_model_ready(PUBLIC_MODEL) and not client.is_model_ready("evil")
        assert embed_query(client, PUBLIC_MODEL, "still serving").shape[0] == 1


def test_clients_cannot_unload_or_load_models_over_grpc(nvembed_server, tmp_path):
    marker = tmp_path / "marker"
    headers, refusal = {}, CLOSED_HEADER
    with nvembed_server.client() as client:
        with pytest.raises(InferenceServerException, match=refusal):
            client.unload_model(PUBLIC_MODEL, headers=headers)
        with pytest.raises(InferenceServerException, match=refusal):
            client.load_model(
                "evil",
                config=json.dumps({"backend": "python", "max_batch_size": 0}),
                files={"file:1/model.py": EVIL_MODEL_PY.replace(b"{marker}", str(marker).encode())},
                headers=headers,
            )
        time.sleep(1)
        assert not marker.exists()
        assert client.is_model_ready(PUBLIC_MODEL)
        assert embed_documents(client, PUBLIC_MODEL, TEXTS).shape[0] == len(TEXTS)


def test_ports_bind_to_loopback_by_default(nvembed_server):
    """/proc/net/tcp lists listening sockets as hex address:port; 0100007F is 127.0.0.1. Triton's
    three ports and the OpenAI front's."""
    wait_for_api(nvembed_server)
    ports = {nvembed_server.http_port, nvembed_server.metrics_port, int(nvembed_server.url.rsplit(":", 1)[1]),
             nvembed_server.openai_port}  # fmt: skip
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                listening[int(port, 16)] = address
    assert set(listening) == ports
    assert all(address.endswith("0100007F") for address in listening.values()), listening


# --- bounded requests ----------------------------------------------------------------------------


def test_too_many_bytes_is_refused_naming_the_limit(nvembed_server):
    big = ["x" * (6 * 2**20)] * 3  # 18 MiB > 16 MiB
    with nvembed_server.client() as client, pytest.raises(InferenceServerException) as raised:
        infer(client, PUBLIC_MODEL, [bytes_input(contract.DOCUMENTS_INPUT, [big], [1, len(big)])])
    assert "INVALID_ARGUMENT" in str(raised.value.status())
    assert "max_request_bytes" in raised.value.message() and str(16 * 2**20) in raised.value.message()


def test_a_byte_order_mark_is_not_embedded(nvembed_server):
    with nvembed_server.client() as client:
        with_bom, plain = embed_documents(client, PUBLIC_MODEL, ["\ufeffhello", "hello"])
    assert cosine(with_bom, plain) >= 0.99999


def test_a_huge_document_is_cut_before_tokenising_and_others_are_not_stalled(nvembed_server):
    huge = "word " * (2 * 2**20)  # 10 MiB, far over max_length tokens
    with nvembed_server.client() as client:
        started = time.monotonic()
        cut = embed_documents(client, PUBLIC_MODEL, [huge])
        elapsed = time.monotonic() - started
        prefix = embed_documents(client, PUBLIC_MODEL, ["word " * (TEST_MAX_LENGTH * 4)])
    assert elapsed < 10, f"a 10 MiB document took {elapsed:.1f} s"
    assert cosine(cut, prefix) >= 0.99999  # both are truncated to the same max_length tokens


def test_oversized_requests_leave_memory_and_speed_as_they_were(nvembed_server):
    with nvembed_server.client() as client:
        embed_query(client, PUBLIC_MODEL, "warm up")
        before = memory_mb(nvembed_server)
        started = time.monotonic()
        embed_query(client, PUBLIC_MODEL, "a normal query")
        normal_s = time.monotonic() - started
        big = ["y" * (9 * 2**20)] * 2  # 18 MiB
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(InferenceServerException, match="max_request_bytes"):
                embed_documents(client, PUBLIC_MODEL, big)
            reject_s = time.monotonic() - started
        after = memory_mb(nvembed_server)
        started = time.monotonic()
        embed_query(client, PUBLIC_MODEL, "a normal query")
        normal_after_s = time.monotonic() - started
    query_ms = f"{normal_s * 1e3:.0f} -> {normal_after_s * 1e3:.0f} ms"
    print(f"memory {before:.0f} -> {after:.0f} MB; reject {reject_s * 1e3:.0f} ms; query {query_ms}")
    assert after - before < 300, f"memory grew from {before:.0f} to {after:.0f} MB"
    assert reject_s < 5
    assert normal_after_s < max(1.0, 5 * normal_s)


# --- work nobody waits for ----------------------------------------------------------------------

# 1024 texts over max_length (TEST_MAX_LENGTH tokens each): ~260k tokens, ~3 s of passes here.
LARGE_REQUEST = [f"doc {i} " + "bread flour yeast water salt " * 60 for i in range(1024)]
LARGE_REQUEST_TOKENS = len(LARGE_REQUEST) * TEST_MAX_LENGTH


def large_request():
    return [bytes_input(contract.DOCUMENTS_INPUT, [LARGE_REQUEST], [1, len(LARGE_REQUEST)])]


def wait_until_idle(server, timeout_s: float = 60.0) -> None:
    """Until the model holds nothing and nothing is queued (its gauge and Triton's), for a moment."""
    deadline, idle_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        values = scrape_metrics(server.metrics_port)
        busy = sum(v for (name, _), v in values.items() if name in (EXECUTING_METRIC, "nv_inference_pending_request_count"))
        idle_since = (idle_since or time.monotonic()) if not busy else None
        if idle_since and time.monotonic() - idle_since > 1.0:  # past the metrics' send interval
            return
        time.sleep(0.1)
    raise AssertionError(f"the server was still busy after {timeout_s:.0f} s: the abandoned work was computed")


def computed_while(server, action) -> tuple[float, float]:
    """Runs `action`, waits until the server is idle again: (tokens its forward passes computed,
    documents it embedded) meanwhile, from the model's own counters. serve.sh's health probes, a
    query every few seconds, count as prompt="query": they add a few tokens and no document."""

    def counters():
        values = scrape_metrics(server.metrics_port)
        model = ("model", PUBLIC_MODEL)
        tokens = sum(v for (n, labels), v in values.items() if n == "nvembed_padded_tokens_total" and model in labels)
        documents = ("prompt", contract.DOCUMENT_PROMPT)
        texts = sum(v for (n, labels), v in values.items() if n == "nvembed_texts_total" and {model, documents} <= set(labels))
        return tokens, texts

    wait_until_idle(server)
    tokens, texts = counters()
    action()
    wait_until_idle(server)
    after = counters()
    return after[0] - tokens, after[1] - texts


def test_work_abandoned_by_its_clients_is_skipped(nvembed_server):
    """20 large requests whose clients time out after 50 ms: the model computes almost none of their
    ~5M tokens, and embeds none of their texts (counted by the model itself, not timed)."""

    def abandon(_):
        with nvembed_server.client() as client, pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
            client.infer(PUBLIC_MODEL, large_request(), client_timeout=0.05)

    def abandon_20():
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(abandon, range(20)))

    tokens, texts = computed_while(nvembed_server, abandon_20)
    print(f"20 abandoned requests of {LARGE_REQUEST_TOKENS} tokens each: {tokens:.0f} tokens computed, {texts:.0f} documents")
    assert tokens < 0.05 * 20 * LARGE_REQUEST_TOKENS
    assert texts == 0


def test_work_of_killed_clients_is_skipped(nvembed_server):
    """Clients killed mid-request (their connections drop): their work is not finished either.
    Each client sends large requests one after another, so it is mid-request whenever it is killed."""
    client_code = (
        "import sys, numpy as np, tritonclient.grpc as g\n"
        "docs = [f'doc {i} ' + 'bread flour yeast water salt ' * 60 for i in range(1024)]\n"
        "t = g.InferInput('documents', [1, 1024], 'BYTES')\n"
        "t.set_data_from_numpy(np.array([docs], dtype=object))\n"
        f"client = g.InferenceServerClient('{nvembed_server.url}')\n"
        f"for _ in range(100): client.infer('{PUBLIC_MODEL}', [t])\n"
    )
    still_waiting = []

    def kill_8_clients():
        clients = [subprocess.Popen([sys.executable, "-c", client_code]) for _ in range(8)]
        time.sleep(4)  # connected, sent, and being worked on
        still_waiting.extend(process.poll() is None for process in clients)
        for process in clients:
            process.kill()
            process.wait()

    tokens, _ = computed_while(nvembed_server, kill_8_clients)
    print(f"8 killed clients: {tokens:.0f} tokens computed, of {8 * LARGE_REQUEST_TOKENS} sent in the requests killed")
    assert all(still_waiting), "a client ended before it was killed (an error?)"
    # Their requests' work up to the kill, and little after it: far less than one request each.
    assert tokens < 4 * LARGE_REQUEST_TOKENS


def test_a_request_timeout_answers_at_once_and_stops_the_work(nvembed_server):
    """tritonclient's per-request `timeout` (microseconds): the request fails as cancelled at its
    timeout, and almost none of its work is computed."""
    failed_after = []

    def time_out():
        with nvembed_server.client() as client:
            started = time.monotonic()
            with pytest.raises(InferenceServerException, match="timeout passed") as raised:
                client.infer(PUBLIC_MODEL, large_request(), timeout=200_000)
            failed_after.append(time.monotonic() - started)
            assert "CANCELLED" in str(raised.value.status())

    tokens, texts = computed_while(nvembed_server, time_out)
    print(f"timeout 200 ms: failed after {failed_after[0]:.2f} s; {tokens:.0f} of {LARGE_REQUEST_TOKENS} tokens computed")
    assert failed_after[0] < 1.5
    assert tokens < 0.2 * LARGE_REQUEST_TOKENS and texts == 0


# --- self-healing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, tiny_checkpoint):
    server = start_tiny_server(tmp_path_factory.mktemp("fault-server"), tiny_checkpoint)
    yield server
    stop_server(server)


def test_a_killed_stub_is_repaired_under_load(fault_server):
    """Clients (the Python client, which retries UNAVAILABLE) keep sending; every call succeeds
    with the same embeddings, readiness is false while the server restarts, and requests succeed
    again well within a minute."""
    with EmbeddingClient(fault_server.url) as client:
        expected = client.encode(TEXTS)
        stub = next(s for s in stubs_of(tritonserver_pid(fault_server)) if s.instance == f"{PUBLIC_MODEL}_0_0")
        results, failures, stop = [], [], threading.Event()

        def load():
            while not stop.is_set():
                try:
                    results.append((time.monotonic(), client.encode(TEXTS)))
                except Exception as error:  # noqa: BLE001 - every failure is reported by the assert below
                    failures.append(error)

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(load)
            time.sleep(1)
            os.kill(stub.pid, signal.SIGKILL)
            killed = time.monotonic()
            saw_not_ready = False
            while time.monotonic() - killed < RECOVERY_LIMIT_S:
                try:
                    with fault_server.client() as probe:
                        ready = probe.is_server_ready() and probe.is_model_ready(PUBLIC_MODEL)
                except InferenceServerException:
                    ready = False
                saw_not_ready |= not ready
                if saw_not_ready and ready and any(t > time.monotonic() - 1 for t, _ in results):
                    break
                time.sleep(0.1)
            recovered_s = time.monotonic() - killed
            time.sleep(1)
            stop.set()
    print(f"requests succeed again {recovered_s:.1f} s after the kill")
    assert not failures, failures[:3]
    assert saw_not_ready, "readiness never turned false"
    assert recovered_s < RECOVERY_LIMIT_S
    assert all(np.all(cosine(v, expected) >= 0.99999) for _, v in results)
    deadline = time.monotonic() + 10  # serve.sh logs the restart once its own readiness poll sees it
    while "restarted and ready" not in fault_server.console_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "restarted and ready" in fault_server.console_path.read_text()


# --- stops that drain ------------------------------------------------------------------------------


def test_sigterm_serves_requests_in_flight_then_refuses_and_exits(tmp_path, tiny_checkpoint):
    server = start_tiny_server(tmp_path, tiny_checkpoint)
    documents = [f"document {i} " + "about bread and flour " * 40 for i in range(32)]
    try:
        with server.client() as client:
            expected = embed_documents(client, PUBLIC_MODEL, documents)
        pid = tritonserver_pid(server)

        def one_request():
            with server.client() as client:
                return embed_documents(client, PUBLIC_MODEL, documents)

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(one_request) for _ in range(24)]
            time.sleep(0.3)
            assert not all(f.done() for f in futures), "the requests finished before SIGTERM; make them longer"
            server.process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
        assert all(np.all(cosine(r, expected) >= 0.99999) for r in results)
        # The door closes when the launcher sees the queue empty (a request arriving before that is
        # still accepted, by design); our last response can reach us a moment before it looks.
        door = closed_flag(server.log_path.parent)
        while not door.exists() and time.monotonic() - stopped < 20:
            time.sleep(0.01)
        assert door.exists(), "the drain never stopped taking new requests"
        with pytest.raises(InferenceServerException) as refused, server.client() as client:
            embed_query(client, PUBLIC_MODEL, "too late")
        assert "UNAVAILABLE" in str(refused.value.status())
        server.process.wait(timeout=20)
        gone_s = time.monotonic() - stopped
        assert not Path(f"/proc/{pid}").exists(), "tritonserver outlived serve.sh"
        print(f"drained 24 requests and exited {gone_s:.1f} s after SIGTERM")
        assert gone_s < 20
        assert server.process.returncode == 0
    finally:
        stop_server(server)
