"""Hard edges through real servers, from outside as a hostile or merely heavy client would meet them:
Triton's administrative APIs are closed, a slow valid request is never taken for a fault and does
not hold short ones, a stuck model is restarted, every death is seen after any number of
restarts, and no run leaves shared memory or run directories behind, whatever is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from conftest import SERVE_SH, start_server, stop_server
from grpc_helpers import bytes_input, embed_documents, embed_query
from openai import OpenAI
from server_processes import http, scrape_metrics, tritonserver_pid, wait_for_api
from tritonclient.utils import InferenceServerException

from nvembed_triton.client import EmbeddingClient
from nvembed_triton.launcher.leftovers import SHM_DIR
from nvembed_triton.launcher.memory import find_jemalloc
from nvembed_triton.launcher.server import CLOSED_HEADER, free_port, stubs_of, wait_until_ready
from nvembed_triton.protocol.contract import INFERENCE_KEY_HEADER, PUBLIC_MODEL
from nvembed_triton.protocol.errors import UnauthorizedError

pytestmark = pytest.mark.server  # starts real tritonservers

STALL_TIMEOUT_S = 3.0
# The supervisor looks often and gives up on a silent model quickly, so the tests stay short.
FAST_SUPERVISOR = {"NVEMBED_HEALTH_INTERVAL_S": "0.5", "NVEMBED_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S)}
RECOVERY_LIMIT_S = 60.0


def region_prefix(server) -> str:
    """The shared-memory prefix of the server's run: its stubs' regions are named with it."""
    regions = {stub.shm_region for stub in stubs_of(tritonserver_pid(server))}
    prefixes = {region.split("_", 1)[0] + "_" for region in regions}
    assert len(prefixes) == 1 and next(iter(prefixes)).startswith("nvembed-"), regions
    return next(iter(prefixes))


def regions_with(prefix: str) -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{prefix}*")}


def restarts(server) -> int:
    return server.console_path.read_text().count("restarted and ready")


def wait_for_restarts(server, count: int, timeout_s: float = RECOVERY_LIMIT_S) -> float:
    started = time.monotonic()
    while restarts(server) < count:
        console = server.console_path.read_text()
        assert time.monotonic() - started < timeout_s, f"no restart {count} within {timeout_s} s:\n{console}"
        time.sleep(0.2)
    return time.monotonic() - started


# --- only inference, health, metadata and metrics are open ----------------------------------------


def closed_key(server) -> str:
    """The key that closes Triton's restricted APIs, read from tritonserver's command line as any
    local user can: it must be of no use to them."""
    arguments = Path(f"/proc/{tritonserver_pid(server)}/cmdline").read_bytes().decode().split("\0")
    rule = next(a for a in arguments if a.startswith("--http-restricted-api="))
    return rule.split("=", 2)[2]


def test_clients_cannot_register_shared_memory_or_touch_logging_statistics_or_trace_over_http(nvembed_server):
    """The attack: register a stub's own region (its name is visible in /dev/shm and in the stub's
    command line), then have an inference write its output there. Registration is refused, also to
    a client that sends the key read from tritonserver's command line, as far as HTTP can carry it."""
    stub_region = stubs_of(tritonserver_pid(nvembed_server))[0].shm_region
    key = closed_key(nvembed_server)
    assert key.endswith("\n")  # no HTTP header and no gRPC metadata can carry a line feed
    attempts = [
        ("POST", "/v2/systemsharedmemory/region/evil/register", {"key": f"/{stub_region}", "offset": 0, "byte_size": 4096}),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("POST", "/v2/systemsharedmemory/unregister", None),
        ("POST", "/v2/cudasharedmemory/region/evil/register", {"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 1}),
        ("GET", "/v2/logging", None),
        ("POST", "/v2/logging", {"log_verbose_level": 1, "log_error": False}),
        ("GET", f"/v2/models/{PUBLIC_MODEL}/stats", None),
        ("GET", "/v2/trace/setting", None),
        ("POST", "/v2/repository/index", {}),
    ]
    for headers in ({}, {CLOSED_HEADER: key.strip()}):
        for method, path, body in attempts:
            status, text = http(nvembed_server, method, path, body, headers=headers)
            assert status == 403 and CLOSED_HEADER in text, (method, path, status, text)
    with pytest.raises(ValueError, match="Invalid header value"):  # the whole key cannot even be sent
        http(nvembed_server, "GET", "/v2/logging", headers={CLOSED_HEADER: key})
    with socket.create_connection(("127.0.0.1", nvembed_server.http_port), timeout=10) as raw:  # nor through a raw socket
        raw.sendall(f"GET /v2/logging HTTP/1.1\r\nHost: x\r\n{CLOSED_HEADER}: {key}\r\nConnection: close\r\n\r\n".encode())
        answer = raw.recv(4096)  # the line feed ends the header: refused, or the connection dropped
        assert b"log_verbose_level" not in answer and not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{PUBLIC_MODEL}", f"/v2/models/{PUBLIC_MODEL}/config"):
        assert http(nvembed_server, "GET", path)[0] == 200, path
    with nvembed_server.client() as client:
        assert embed_documents(client, PUBLIC_MODEL, ["still serving"]).shape[0] == 1


def test_clients_cannot_register_shared_memory_or_touch_logging_statistics_or_trace_over_grpc(nvembed_server):
    stub_region = stubs_of(tritonserver_pid(nvembed_server))[0].shm_region
    key = closed_key(nvembed_server)
    with nvembed_server.client() as client:
        calls = {
            "register system shared memory": lambda h: client.register_system_shared_memory("evil", f"/{stub_region}", 4096,
                                                                                              headers=h),
            "shared memory status": lambda h: client.get_system_shared_memory_status(headers=h),
            "unregister shared memory": lambda h: client.unregister_system_shared_memory(headers=h),
            "register CUDA shared memory": lambda h: client.register_cuda_shared_memory("evil", b"", 0, 1, headers=h),
            "log settings": lambda h: client.get_log_settings(headers=h),
            "change log settings": lambda h: client.update_log_settings({"log_error": False}, headers=h),
            "statistics": lambda h: client.get_inference_statistics(PUBLIC_MODEL, headers=h),
            "trace settings": lambda h: client.get_trace_settings(headers=h),
            "repository index": lambda h: client.get_model_repository_index(headers=h),
        }
        for headers in (None, {f"triton-grpc-protocol-{CLOSED_HEADER}": key.strip()}):
            for what, call in calls.items():
                with pytest.raises(InferenceServerException) as refused:
                    call(headers)
                assert CLOSED_HEADER in str(refused.value), (what, str(refused.value))
        with pytest.raises((ValueError, InferenceServerException)):  # gRPC refuses to send a line feed in metadata
            client.get_log_settings(headers={f"triton-grpc-protocol-{CLOSED_HEADER}": key})
        assert client.is_server_live() and client.get_model_metadata(PUBLIC_MODEL) and client.get_model_config(PUBLIC_MODEL)
        assert embed_query(client, PUBLIC_MODEL, "still serving").shape[0] == 1


# --- busy is not broken ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_text_server(tmp_path_factory, tiny_checkpoint):
    """Texts up to 32768 tokens (the published max_length: one pass of that length takes ~12 s on
    this CPU), and a supervisor that gives up on a silent model after STALL_TIMEOUT_S."""
    env = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_MAX_LENGTH": "32768", **FAST_SUPERVISOR}
    server = start_server(tmp_path_factory.mktemp("long-text-server"), PUBLIC_MODEL, ["--device", "cpu"], env)
    yield server
    stop_server(server)


def test_a_slow_valid_request_is_never_a_fault_and_short_ones_pass_it(long_text_server):
    """Two maximum-length documents: minutes of work on a big model, ~25 s here, many times the
    stall timeout and the probe interval. It completes, nothing restarts, and queries sent meanwhile
    are answered at about their usual latency (before: they waited for the whole request, and the
    supervisor restarted the server under it once its probe had waited 60 s)."""
    server = long_text_server
    long_documents = ["word " * 40_000, "other " * 40_000]  # each over 32768 tokens: cut to 32768
    with server.client() as client:
        alone = []
        for _ in range(5):
            started = time.monotonic()
            embed_query(client, PUBLIC_MODEL, "how long does a query take alone?")
            alone.append(time.monotonic() - started)
    before = server.console_path.read_text()
    outcome = {}

    def long_request():
        started = time.monotonic()
        with server.client() as client:
            outcome["vectors"] = embed_documents(client, PUBLIC_MODEL, long_documents)
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)  # the long request is being computed
    during = []
    with server.client() as client:
        while worker.is_alive():
            started = time.monotonic()
            embed_query(client, PUBLIC_MODEL, "a short question asked meanwhile")
            during.append(time.monotonic() - started)
            time.sleep(0.3)
    worker.join()
    print(f"long request {outcome['seconds']:.1f} s; queries alone p50 {np.median(alone) * 1e3:.0f} ms, "
          f"during it p50 {np.median(during) * 1e3:.0f} ms, max {max(during) * 1e3:.0f} ms ({len(during)} queries)")  # fmt: skip
    assert outcome["seconds"] > 3 * STALL_TIMEOUT_S, "the long request was too quick to test anything"
    assert np.allclose(np.linalg.norm(outcome["vectors"], axis=1), 1.0, atol=1e-3)
    assert "restarting" not in server.console_path.read_text()[len(before) :]
    assert len(during) >= 5 and max(during) < 3.0 and np.median(during) < 1.0


def test_a_stuck_model_is_restarted(long_text_server):
    """A model that stops (SIGSTOP: no CPU, nothing completes) while a query waits: after the
    stall timeout the supervisor restarts the server, and the client's retries succeed."""
    server = long_text_server
    count = restarts(server)
    stub = next(s for s in stubs_of(tritonserver_pid(server)) if s.instance.startswith(PUBLIC_MODEL))
    os.kill(stub.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with EmbeddingClient(server.url) as client:
            vector = client.encode("a query sent to a stuck model", prompt_name="query")
        answered_s = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone once the restart has killed it
            os.kill(stub.pid, signal.SIGCONT)
    wait_for_restarts(server, count + 1)  # the launcher logs it once its own readiness poll sees it
    print(f"stuck model: answered {answered_s:.1f} s after SIGSTOP")
    # Seen by the stall rule, or by Triton's Python backend, which finds the stub unresponsive and
    # fails the probe sent to it ("not healthy"), whichever comes first.
    reason = [line for line in server.console_path.read_text().splitlines() if "restarting tritonserver" in line][-1]
    assert restarts(server) == count + 1 and ("no progress for" in reason or "is not healthy" in reason), reason
    assert abs(np.linalg.norm(vector) - 1) < 1e-3
    assert answered_s < RECOVERY_LIMIT_S


@pytest.fixture(scope="module")
def production_timings_server(tmp_path_factory, tiny_checkpoint):
    """The supervisor's shipped timings (health_interval_s 5, stall_timeout_s 45)."""
    env = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_MAX_LENGTH": "256"}
    server = start_server(tmp_path_factory.mktemp("production-timings"), PUBLIC_MODEL, ["--device", "cpu"], env)
    yield server
    stop_server(server)


def openai_ready(server) -> bool:
    try:
        with urllib.request.urlopen(server.openai_url.removesuffix("/v1") + "/v1/health/ready", timeout=5) as answer:
            return answer.status == 200
    except OSError:  # 503, or the front not answering
        return False


@pytest.mark.parametrize("victim", ["tritonserver", "stub"])
def test_a_hung_server_turns_not_ready_and_is_replaced_within_a_minute(production_timings_server, victim):
    """SIGSTOP: the process is there and silent, as after the shared-memory attack (which hung
    tritonserver for 290 s with health 200). Readiness turns false, and the server is replaced,
    well within 60 s with the shipped timings; then it serves again."""
    server = production_timings_server
    wait_for_api(server)
    assert openai_ready(server)
    count = restarts(server)
    pid = tritonserver_pid(server)
    target = pid if victim == "tritonserver" else stubs_of(pid)[0].pid
    restarting_before = server.console_path.read_text().count("restarting tritonserver")
    os.kill(target, signal.SIGSTOP)
    stopped, not_ready_s, restarting_s = time.monotonic(), None, None
    try:
        with ThreadPoolExecutor(1) as pool:  # a client waiting meanwhile, as real ones would be
            waiting = pool.submit(lambda: EmbeddingClient(server.url).encode(["sent to a hung server"]))
            while restarts(server) == count:
                if not_ready_s is None and not openai_ready(server):
                    not_ready_s = time.monotonic() - stopped
                if restarting_s is None and server.console_path.read_text().count("restarting tritonserver") > restarting_before:
                    restarting_s = time.monotonic() - stopped
                assert time.monotonic() - stopped < RECOVERY_LIMIT_S, server.console_path.read_text()
                time.sleep(0.5)
            replaced_s = time.monotonic() - stopped
            vector = waiting.result(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone once the restart has killed it
            os.kill(target, signal.SIGCONT)
    reason = [line for line in server.console_path.read_text().splitlines() if "restarting tritonserver" in line][-1]
    print(f"{victim} stopped: not ready after {not_ready_s} s, restart began after {restarting_s} s, replaced after "
          f"{replaced_s:.1f} s ({reason})")  # fmt: skip
    assert not_ready_s is not None and not_ready_s < replaced_s
    if victim == "tritonserver":  # silent for seconds before the restart: the supervisor says so meanwhile
        assert restarting_s is not None and not_ready_s < restarting_s
    assert replaced_s < 60 and abs(np.linalg.norm(vector) - 1) < 1e-3
    deadline = time.monotonic() + 30
    while not openai_ready(server):
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.5)


# --- every death is seen, and nothing is left behind ----------------------------------------------


INFERENCE_KEY = "an-operators-inference-key"
UNAUTHORIZED_SERIES = ("nvembed_rejected_requests_total", (("model", PUBLIC_MODEL), ("reason", "unauthorized")))


@pytest.fixture(scope="module")
def restartable_server(tmp_path_factory, tiny_checkpoint):
    """Also requires a key on inference (inference_key): its probe and OpenAI API must send it."""
    env = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_INFERENCE_KEY": INFERENCE_KEY, **FAST_SUPERVISOR}
    server = start_server(tmp_path_factory.mktemp("restartable-server"), PUBLIC_MODEL, ["--device", "cpu"], env)
    yield server
    stop_server(server)


def test_an_inference_key_is_required_of_clients_but_not_of_health_or_metadata(restartable_server):
    server = restartable_server
    keyed = {INFERENCE_KEY_HEADER: INFERENCE_KEY}
    before = server.console_path.read_text()
    refused_before = scrape_metrics(server.metrics_port).get(UNAUTHORIZED_SERIES, 0.0)
    with server.client() as client:
        with pytest.raises(InferenceServerException, match=INFERENCE_KEY_HEADER):  # the seed's call, unchanged
            embed_query(client, PUBLIC_MODEL, "no key")
        with pytest.raises(InferenceServerException, match=INFERENCE_KEY_HEADER) as refused:
            client.infer(PUBLIC_MODEL, [bytes_input("query", ["wrong key"], [1])], headers={INFERENCE_KEY_HEADER: "not the key"})
        assert "INVALID_ARGUMENT" in str(refused.value.status())
        raw = client.infer(PUBLIC_MODEL, [bytes_input("query", ["with the key"], [1])], headers=keyed).as_numpy("embeddings")
        assert client.is_server_live() and client.is_model_ready(PUBLIC_MODEL) and client.get_model_metadata(PUBLIC_MODEL)
        assert client.get_model_config(PUBLIC_MODEL)  # clients read their limits there
    status, text = http(server, "POST", f"/v2/models/{PUBLIC_MODEL}/infer",
                        {"inputs": [{"name": "query", "shape": [1], "datatype": "BYTES", "data": ["no key"]}]})  # fmt: skip
    assert status == 400 and INFERENCE_KEY_HEADER in text
    with EmbeddingClient(server.url, inference_key=INFERENCE_KEY) as client:
        assert float(client.encode("with the key", prompt_name="query") @ raw[0]) > 0.99999
    wait_for_api(server)
    openai = OpenAI(base_url=server.openai_url, api_key="unused")  # the OpenAI API holds the key for Triton
    vector = openai.embeddings.create(model=PUBLIC_MODEL, input=["with the key"], extra_body={"input_type": "query"})
    assert float(np.array(vector.data[0].embedding) @ raw[0]) > 0.99999
    time.sleep(4 * float(FAST_SUPERVISOR["NVEMBED_HEALTH_INTERVAL_S"]))  # several probes, each with the key
    assert "restarting" not in server.console_path.read_text()[len(before) :]
    assert scrape_metrics(server.metrics_port).get(UNAUTHORIZED_SERIES, 0.0) - refused_before == 3  # gRPC twice, HTTP once


@pytest.mark.parametrize("given", [None, "not the key"], ids=["no key", "a wrong key"])
def test_the_python_client_says_the_key_was_refused_at_once(restartable_server, given):
    """Before: 30 retries over 53 s, then ServerUnavailableError, not a word about the key."""
    started = time.monotonic()
    with EmbeddingClient(restartable_server.url, inference_key=given) as client, pytest.raises(UnauthorizedError) as refused:
        client.encode(["bread"])
    assert time.monotonic() - started < 5
    assert "refused the inference key" in str(refused.value)
    assert ("pass inference_key=" if given is None else "check the inference_key") in str(refused.value)


def test_no_key_is_on_any_command_line_or_in_any_log(restartable_server, tmp_path):
    """Every process a local user can list: serve.sh, tritonserver, its stub, the OpenAI front;
    every log. The keys live in the environment, which only their own user can read."""
    server = restartable_server
    wait_for_api(server)
    with EmbeddingClient(server.url, inference_key="a wrong key") as client, pytest.raises(UnauthorizedError):
        client.encode(["a refused request leaves no key in a log"])
    processes = [server.process.pid, tritonserver_pid(server), *(s.pid for s in stubs_of(tritonserver_pid(server)))]
    processes += [c.pid for c in psutil.Process(server.process.pid).children(recursive=True)]
    command_lines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in set(processes)}
    assert len(command_lines) >= 4, command_lines  # serve.sh, tritonserver, the stub, the front
    assert not [pid for pid, line in command_lines.items() if INFERENCE_KEY in line], command_lines
    logs = [server.log_path.read_text(errors="replace"), server.console_path.read_text(errors="replace")]
    assert not any(INFERENCE_KEY in log for log in logs)
    assert oct(Path(f"/proc/{tritonserver_pid(server)}/environ").stat().st_mode & 0o777) == "0o400"


def test_every_death_is_seen_after_any_number_of_restarts_and_leaves_no_shared_memory(restartable_server):
    """Kill the model's stub, again, and tritonserver itself: each time the server is restarted and
    serves, and the run's shared memory is exactly the live stubs' regions (the dead processes'
    regions are gone; before, one crash left 49 regions, up to 653 MiB)."""
    server = restartable_server
    prefix = region_prefix(server)
    victims = [f"{PUBLIC_MODEL}_0_0", f"{PUBLIC_MODEL}_0_0", "tritonserver"]
    with EmbeddingClient(server.url, inference_key=INFERENCE_KEY) as client:
        expected = client.encode(["a document to check against"])
        for round_, victim in enumerate(victims, start=1):
            pid = tritonserver_pid(server)
            stubs = stubs_of(pid)
            target = pid if victim == "tritonserver" else next((s.pid for s in stubs if s.instance == victim), None)
            assert target, f"round {round_}: no {victim} among {sorted(s.instance for s in stubs)}"
            os.kill(target, signal.SIGKILL)
            recovered_s = wait_for_restarts(server, restarts(server) + 1)
            again = client.encode(["a document to check against"])
            live = {stub.shm_region for stub in stubs_of(tritonserver_pid(server))}
            print(f"round {round_}: killed {victim}, restarted in {recovered_s:.1f} s")
            assert float(again[0] @ expected[0]) > 0.99999
            assert regions_with(prefix) == live, f"round {round_}: leftover regions"


def serve_sh_without_run_dir(tiny_checkpoint) -> tuple[subprocess.Popen, str]:
    """serve.sh as a user starts it: its run directory is a temporary one."""
    ports = {name: str(free_port()) for name in ("TRITON_GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_METRICS_PORT")}
    env = {**os.environ, **ports, "PYTHON": sys.executable, "NVEMBED_MODEL_DIR": str(tiny_checkpoint)}
    process = subprocess.Popen([str(SERVE_SH), "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports['TRITON_GRPC_PORT']}"
    wait_until_ready(url, (PUBLIC_MODEL,), process, Path("/nonexistent"), 300)
    return process, url


def test_a_killed_launcher_leaves_nothing_once_a_new_one_starts(tiny_checkpoint, nvembed_server):
    """kill -9 of serve.sh: its tritonserver ends on its own (it is told when its parent dies), but
    regions and the temporary run directory stay. The next serve.sh removes them, and leaves
    another live server's regions alone."""
    process, _ = serve_sh_without_run_dir(tiny_checkpoint)

    class Launcher:  # what tritonserver_pid and region_prefix need
        pass

    launcher = Launcher()
    launcher.process = process
    prefix = region_prefix(launcher)
    triton = tritonserver_pid(launcher)
    arguments = Path(f"/proc/{triton}/cmdline").read_bytes().decode().split("\0")
    repository = next(arg for arg in arguments if arg.startswith("--model-repository="))
    run_dir = Path(repository.split("=", 1)[1]).parent
    other = regions_with(region_prefix(nvembed_server))
    process.kill()
    process.wait()
    deadline = time.monotonic() + 90
    while Path(f"/proc/{triton}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{triton}").exists(), "tritonserver outlived its launcher"
    left = regions_with(prefix)
    print(f"after kill -9 of serve.sh: {len(left)} regions and {'a' if run_dir.exists() else 'no'} run directory left")
    assert run_dir.exists()  # what the next serve.sh must clean (regions may or may not remain)
    second, url = serve_sh_without_run_dir(tiny_checkpoint)
    try:
        assert not regions_with(prefix) and not run_dir.exists()
        assert other <= regions_with(region_prefix(nvembed_server))  # the live server's are untouched
        with grpcclient.InferenceServerClient(url) as client:
            tensor = bytes_input("query", ["served by the new launcher"], [1])
            assert client.infer(PUBLIC_MODEL, [tensor]).as_numpy("embeddings").shape == (1, 64)
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(timeout=120)


def test_tritonserver_and_every_stub_run_with_the_allocator_the_launcher_chose(nvembed_server):
    """Under a long mixed load glibc malloc's memory kept growing (bench/RESULTS.md): serve.sh
    preloads jemalloc into tritonserver and every stub where it is installed, and says which."""
    pid = tritonserver_pid(nvembed_server)
    processes = [pid, *(stub.pid for stub in stubs_of(pid))]
    console = nvembed_server.console_path.read_text()
    if find_jemalloc() is None:  # .ci/run installs it; a machine without it says how to get it
        assert "libjemalloc.so.2 not found (apt-get install libjemalloc2)" in console
        return
    assert "malloc: jemalloc" in console
    unmapped = [p for p in processes if "libjemalloc" not in Path(f"/proc/{p}/maps").read_text()]
    assert not unmapped, f"{len(unmapped)} of {len(processes)} processes run without jemalloc"
