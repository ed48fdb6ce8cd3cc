"""The OpenAI/NIM-compatible HTTP API, through clients nobody here wrote (the openai SDK,
LangChain's OpenAIEmbeddings, NVIDIA's NVIDIAEmbeddings), against real servers: every vector equals
the same text through the gRPC contract. Then every error, through raw HTTP and plain sockets; the
front's own process and its API key; large query batches."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import psutil
import pytest
import tritonclient.grpc as grpcclient
from conftest import TEST_MAX_LENGTH
from grpc_helpers import bytes_input, cosine, embed_documents, embed_query
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_processes import wait_for_api
from texts import AWKWARD, DOCUMENTS
from tritonclient.utils import InferenceServerException

from nvembed_triton.client import EmbeddingClient
from nvembed_triton.launcher.serve import DEMO_MODEL, OpenAIServer
from nvembed_triton.launcher.server import ServerSettings, free_port
from nvembed_triton.openai_api.app import body_limit
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL

pytestmark = pytest.mark.server  # starts real tritonservers

TEXTS = [DOCUMENTS[0], DOCUMENTS[2], AWKWARD[1]]
MATCH = 0.99999


@pytest.fixture(scope="module")
def api(nvembed_server):
    wait_for_api(nvembed_server)
    return nvembed_server


@pytest.fixture(scope="module")
def minilm_api(minilm_server):
    wait_for_api(minilm_server)
    return minilm_server


def post(server, body: bytes | dict, path: str = "/embeddings") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.openai_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


# --- real clients --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_the_openai_sdk_gets_the_contracts_vectors(api, encoding_format):
    """None: the SDK asks for base64 itself and decodes it."""
    client = OpenAI(base_url=api.openai_url, api_key="not-needed")
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=PUBLIC_MODEL, input=TEXTS, **extra)
    vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
    if encoding_format == "base64":  # asked for explicitly, the SDK hands the string back
        vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors]
    with api.client() as grpc:
        expected = embed_documents(grpc, PUBLIC_MODEL, TEXTS)
    assert np.all(cosine(np.array(vectors, dtype=np.float32), expected) >= MATCH)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


@pytest.mark.parametrize("which", [PUBLIC_MODEL, DEMO_MODEL])
def test_langchains_openai_embeddings(request, which):
    from langchain_openai import OpenAIEmbeddings

    api = request.getfixturevalue("api" if which == PUBLIC_MODEL else "minilm_api")
    embeddings = OpenAIEmbeddings(model=which, base_url=api.openai_url, api_key="not-needed", check_embedding_ctx_length=False)
    with api.client() as grpc:
        expected = embed_documents(grpc, which, TEXTS)
    assert np.all(cosine(np.array(embeddings.embed_documents(TEXTS)), expected) >= MATCH)
    # OpenAI's dialect has no query type: a query is embedded as a passage.
    assert cosine(np.array(embeddings.embed_query(TEXTS[0])), expected[0]) >= MATCH


def test_nvidias_langchain_client_with_input_type_and_truncate(api):
    from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings

    long_text = " ".join(f"word{i}" for i in range(TEST_MAX_LENGTH * 2))
    embeddings = NVIDIAEmbeddings(base_url=api.openai_url, model=PUBLIC_MODEL, api_key="not-needed", truncate="END")
    with api.client() as grpc:
        query = embed_query(grpc, PUBLIC_MODEL, TEXTS[0])[0]  # input_type query: the query instruction
        passages = embed_documents(grpc, PUBLIC_MODEL, TEXTS + [long_text])  # input_type passage: none
    assert cosine(np.array(embeddings.embed_query(TEXTS[0])), query) >= MATCH
    assert np.all(cosine(np.array(embeddings.embed_documents(TEXTS + [long_text])), passages) >= MATCH)
    refusing = NVIDIAEmbeddings(base_url=api.openai_url, model=PUBLIC_MODEL, api_key="not-needed", truncate="NONE")
    with pytest.raises(Exception, match="truncate is NONE"):
        refusing.embed_documents([long_text])


def test_a_sentence_transformers_model_through_the_openai_sdk(minilm_api):
    client = OpenAI(base_url=minilm_api.openai_url, api_key="not-needed")
    response = client.embeddings.create(model=DEMO_MODEL, input=TEXTS, encoding_format="float")
    with minilm_api.client() as grpc:
        expected = embed_documents(grpc, DEMO_MODEL, TEXTS)
    assert np.all(cosine(np.array([item.embedding for item in response.data]), expected) >= MATCH)


def test_models_and_health(api):
    with urllib.request.urlopen(api.openai_url + "/models", timeout=10) as response:
        assert [model["id"] for model in json.loads(response.read())["data"]] == [PUBLIC_MODEL]
    for path in ("/v1/health/ready", "/health"):
        with urllib.request.urlopen(f"http://127.0.0.1:{api.openai_port}{path}", timeout=10) as response:
            assert response.status == 200


def test_large_inputs_are_split_and_keep_their_order(api):
    texts = [f"document number {i}" for i in range(1500)]  # over max_documents (1024)
    status, body, _ = post(api, {"model": PUBLIC_MODEL, "input": texts})
    assert status == 200 and [item["index"] for item in body["data"]] == list(range(1500))
    with api.client() as grpc:
        expected = embed_documents(grpc, PUBLIC_MODEL, texts[1000:1010])
    assert np.all(cosine(np.array([item["embedding"] for item in body["data"][1000:1010]]), expected) >= MATCH)


# --- errors --------------------------------------------------------------------------------------

LONG = " ".join(f"word{i}" for i in range(TEST_MAX_LENGTH * 2))
DEEP = 100_000
ERRORS = {
    "invalid JSON": (b"{not json", 400, None),
    "empty list": ({"model": PUBLIC_MODEL, "input": []}, 400, "input"),
    "empty string": ({"model": PUBLIC_MODEL, "input": ["ok", ""]}, 400, "input"),
    "non-string item": ({"model": PUBLIC_MODEL, "input": ["ok", 3.5]}, 400, "input"),
    "token ids": ({"model": PUBLIC_MODEL, "input": [[1, 2, 3]]}, 400, "input"),
    "too many inputs": ({"model": PUBLIC_MODEL, "input": ["t"] * 2049}, 400, "input"),
    "unknown model": ({"model": "gpt-4", "input": "hello"}, 404, "model"),
    "other dimensions": ({"model": PUBLIC_MODEL, "input": "hello", "dimensions": 128}, 400, "dimensions"),
    "bad encoding_format": ({"model": PUBLIC_MODEL, "input": "hello", "encoding_format": "int8"}, 400, "encoding_format"),
    "bad input_type": ({"model": PUBLIC_MODEL, "input": "hello", "input_type": "code"}, 400, "input_type"),
    "bad truncate": ({"model": PUBLIC_MODEL, "input": "hello", "truncate": "MIDDLE"}, 400, "truncate"),
    "over-long text, truncate NONE": ({"model": PUBLIC_MODEL, "input": [LONG], "truncate": "NONE"}, 400, "input"),
    # Type confusion and hostile bodies (several were 500s, or accepted, before).
    "nested 100,000 deep": (b'{"model": "nv-embed-v2", "input": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, None),
    "input_type a list": ({"model": PUBLIC_MODEL, "input": "hello", "input_type": ["query"]}, 400, "input_type"),
    "input_type an object": ({"model": PUBLIC_MODEL, "input": "hello", "input_type": {"query": 1}}, 400, "input_type"),
    "input_type an empty list": ({"model": PUBLIC_MODEL, "input": "hello", "input_type": []}, 400, "input_type"),
    "encoding_format an empty object": ({"model": PUBLIC_MODEL, "input": "hello", "encoding_format": {}}, 400, "encoding_format"),
    "truncate a list": ({"model": PUBLIC_MODEL, "input": "hello", "truncate": ["END"]}, 400, "truncate"),
    "dimensions of 5000 digits": (b'{"model": "nv-embed-v2", "input": "hello", "dimensions": ' + b"9" * 5000 + b"}", 400, None),
    "a token id of 5000 digits": (b'{"model": "nv-embed-v2", "input": [' + b"7" * 5000 + b"]}", 400, None),
    "dimensions NaN": (b'{"model": "nv-embed-v2", "input": "hello", "dimensions": NaN}', 400, "dimensions"),
    "model a list": ({"model": [PUBLIC_MODEL], "input": "hello"}, 400, "model"),
    "model missing": ({"input": "hello"}, 400, "model"),
    "input an object": ({"model": PUBLIC_MODEL, "input": {"text": "hello"}}, 400, "input"),
    "input missing": ({"model": PUBLIC_MODEL}, 400, "input"),
    "user an object": ({"model": PUBLIC_MODEL, "input": "hello", "user": {"id": 1}}, 400, "user"),
    "a lone surrogate": (b'{"model": "nv-embed-v2", "input": ["\\ud800"]}', 400, None),
    "not UTF-8": (b'{"model": "nv-embed-v2", "input": ["\xff"]}', 400, None),
    "a JSON array body": (b'["hello"]', 400, None),
    "a million empty objects": (b'{"model": "nv-embed-v2", "input": [' + b"{}," * 10**6 + b'"x"]}', 400, None),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_client_mistakes_get_openais_error_shape_never_500(api, case):
    body, status, param = ERRORS[case]
    got, payload, _ = post(api, body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "/v1/embeddings", 405), ("PUT", "/v1/models", 405), ("POST", "/v1/embedding", 404), ("GET", "/nothing", 404)],
)
def test_wrong_methods_and_paths_get_openais_error_shape(api, method, path, status):
    connection = http.client.HTTPConnection("127.0.0.1", api.openai_port, timeout=30)
    connection.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    assert response.status == status and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == "invalid_request_error"


class RawExchange:
    """One HTTP/1.1 request over a plain socket, for bodies no HTTP client would send. A thread reads
    the answer as it comes, so an answer given while the body is still being sent is seen."""

    def __init__(self, port: int, head: bytes):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.socket.sendall(head)
        self.sent, self.sent_when_answered, self.answered_at = 0, None, None
        self.received, self.closed = bytearray(), threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := self.socket.recv(2**16):
                if self.sent_when_answered is None:
                    self.sent_when_answered, self.answered_at = self.sent, time.monotonic()
                self.received += chunk
        except OSError:  # reset by the server: it closed without reading the rest
            pass
        self.closed_at = time.monotonic()
        self.closed.set()

    def keep_sending(self, data: bytes, pace_s: float, for_s: float) -> None:
        """As a client that goes on sending whatever the server answers."""
        deadline = time.monotonic() + for_s
        while not self.closed.wait(pace_s) and time.monotonic() < deadline and self.send(data):
            pass

    def closed_soon_after_answer(self, within_s: float = 2.0) -> bool:
        return self.closed.is_set() and self.answered_at is not None and self.closed_at - self.answered_at < within_s

    def send(self, data: bytes) -> bool:
        try:
            self.socket.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def answer(self, timeout_s: float) -> tuple[int, dict, dict]:
        """Status, headers and JSON body once the server has closed the connection (or after timeout_s)."""
        self.closed.wait(timeout_s)
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])

    def close(self) -> None:
        self.socket.close()


def front_process(server) -> psutil.Process:
    """The process listening on the server's OpenAI port: the launcher or one of its children."""
    launcher = psutil.Process(server.process.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.openai_port for c in process.net_connections("tcp")):
                return process
    raise AssertionError("no process listens on the OpenAI port")


def server_body_limit(server) -> int:
    with server.client() as grpc:
        return body_limit(grpc.get_model_config(PUBLIC_MODEL, as_json=True))


def test_a_chunked_body_over_the_limit_is_refused_at_the_limit_and_never_held(api):
    """300 MB sent chunked (no Content-Length): the 413 comes after about the limit, the server
    closes the connection, and the front's memory never grows by the body's size."""
    limit, front = server_body_limit(api), front_process(api)
    baseline, peak, sampling = front.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], front.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    exchange = RawExchange(api.openai_port, (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ))  # fmt: skip
    start = b'{"model": "nv-embed-v2", "input": ["'
    exchange.send(b"%x\r\n%s\r\n" % (len(start), start))
    piece = b"y" * 2**20
    while exchange.sent < 300 * 2**20 and exchange.send(b"%x\r\n%s\r\n" % (len(piece), piece)):
        pass
    exchange.send(b'3\r\n"]}\r\n0\r\n\r\n')  # the end, should the server still be reading
    try:
        status, headers, payload = exchange.answer(timeout_s=60)
    finally:
        sampling.set()
        sampler.join()
        exchange.close()
    grew = (peak[0] - baseline) / 2**20
    sent = exchange.sent_when_answered / 2**20
    print(f"413 after {sent:.0f} MiB sent (limit {limit / 2**20:.0f} MiB); the front grew {grew:.0f} MiB")
    assert status == 413 and payload["error"]["code"] == "body_too_large" and payload["error"]["type"] == "invalid_request_error"
    slack = 16 * 2**20  # what the two sockets' buffers hold between us and the server
    assert exchange.sent_when_answered <= limit + slack, f"answered after {exchange.sent_when_answered} bytes, limit {limit}"
    assert exchange.closed_soon_after_answer() and exchange.sent < 300 * 2**20, "the server went on reading after its answer"
    assert headers.get("connection") == "close"
    assert peak[0] - baseline < limit + 64 * 2**20, f"the front grew by {grew:.0f} MiB"


def test_a_declared_size_over_the_limit_is_413_before_any_body(api):
    """The refusal comes from the declared size, and the server closes the connection rather than
    read (and discard) the body the client goes on sending."""
    exchange = RawExchange(api.openai_port, (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (server_body_limit(api) + 1)
    ))  # fmt: skip
    exchange.keep_sending(b" " * 1024, pace_s=0.05, for_s=10)
    status, _, payload = exchange.answer(timeout_s=30)
    exchange.close()
    assert status == 413 and payload["error"]["code"] == "body_too_large" and exchange.closed_soon_after_answer()


def test_the_openai_sdk_sees_the_413_of_a_body_over_the_limit(api):
    """The SDK sends the whole body before it reads; the server answers early and closes."""
    client = OpenAI(base_url=api.openai_url, api_key="not-needed", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.embeddings.create(model=PUBLIC_MODEL, input=["z" * server_body_limit(api)])
    assert raised.value.status_code == 413 and raised.value.code == "body_too_large"


@contextlib.contextmanager
def own_front(server, *args: str):
    """`python -m nvembed_triton.openai_api.app` in front of the server's Triton, with its own options."""
    port = free_port()
    command = [sys.executable, "-m", "nvembed_triton.openai_api.app", "--triton-url", server.url, "--port", str(port), *args]
    process = subprocess.Popen(command)
    try:
        wait_for_api(type("Front", (), {"openai_port": port}), timeout_s=30)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


BODY_TIMEOUT_S = 1.0


@pytest.mark.parametrize("pace_s", [0.2, None], ids=["trickling", "silent"])
def test_a_body_that_does_not_arrive_in_time_is_408(api, pace_s):
    with own_front(api, "--body-timeout-s", str(BODY_TIMEOUT_S)) as port:
        exchange = RawExchange(port, (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ))  # fmt: skip
        started = time.monotonic()
        while pace_s and not exchange.closed.wait(pace_s) and time.monotonic() - started < 10 * BODY_TIMEOUT_S:
            exchange.send(b" ")  # JSON whitespace, one byte at a time
        status, _, payload = exchange.answer(timeout_s=10 * BODY_TIMEOUT_S)
        elapsed = time.monotonic() - started
        exchange.close()
    assert status == 408 and set(payload["error"]) == {"message", "type", "param", "code"}
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5 and exchange.closed.is_set()


def test_over_capacity_is_429_with_retry_after(small_capacity_server):
    """A server whose model holds 8 requests, through HTTP: a burst gets 429s with Retry-After, never a
    500, and what is served is right."""
    wait_for_api(small_capacity_server)
    burst = {"model": PUBLIC_MODEL, "input": [f"document {i} " + "bread flour yeast " * 60 for i in range(64)]}
    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(lambda _: post(small_capacity_server, burst), range(64)))
    refused = [(status, headers) for status, _, headers in outcomes if status != 200]
    assert refused and all(status == 429 and headers.get("retry-after") for status, headers in refused)
    served = [body for status, body, _ in outcomes if status == 200]
    assert served, "nothing was served"
    with small_capacity_server.client() as grpc:
        expected = embed_documents(grpc, PUBLIC_MODEL, burst["input"][:3])
    assert all(np.all(cosine(np.array([d["embedding"] for d in body["data"][:3]]), expected) >= MATCH) for body in served)


def test_triton_not_ready_is_503(tmp_path):
    """The API alone, pointed at a Triton that is not there."""
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nvembed_triton.openai_api.app",
            "--triton-url",
            f"127.0.0.1:{free_port()}",
            "--port",
            str(port),
        ]
    )
    try:

        class Down:
            openai_port = port
            openai_url = f"http://127.0.0.1:{port}/v1"

        deadline = time.monotonic() + 30
        while True:
            try:
                status, payload, headers = post(Down, {"model": PUBLIC_MODEL, "input": "hello"})
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 503 and headers.get("retry-after") and payload["error"]["code"] == "model_not_ready"
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/ready", timeout=10)
        assert raised.value.code == 503
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- the front's own process ---------------------------------------------------------------------


def test_the_front_is_restarted_after_a_kill_while_grpc_goes_on(api):
    """kill -9 of the front: the launcher starts a new one within seconds; gRPC never stops."""
    front = front_process(api)
    assert front.pid != api.process.pid, "the front runs inside the launcher"
    stop, served, failures = threading.Event(), [0], []

    def grpc_traffic() -> None:
        with api.client() as grpc:
            while not stop.is_set():
                try:
                    embed_query(grpc, PUBLIC_MODEL, "is gRPC still served?")
                    served[0] += 1
                except InferenceServerException as error:
                    failures.append(error)
                time.sleep(0.05)

    traffic = threading.Thread(target=grpc_traffic)
    traffic.start()
    try:
        time.sleep(0.5)
        front.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while True:
            with contextlib.suppress(OSError):
                if post(api, {"model": PUBLIC_MODEL, "input": "back?"})[0] == 200:
                    break
            assert time.monotonic() - killed_at < 30, "the OpenAI API did not come back"
            time.sleep(0.1)
        back_after_s = time.monotonic() - killed_at
        time.sleep(0.5)
    finally:
        stop.set()
        traffic.join()
    print(f"the OpenAI API answered again {back_after_s:.1f} s after kill -9; gRPC served {served[0]} queries meanwhile")
    assert not failures and served[0] > 0
    assert front_process(api).pid != front.pid
    assert "serve.sh: the OpenAI API exited with code -9; restarting it" in api.console_path.read_text()


def test_an_api_key_guards_every_v1_endpoint_but_health(api, tmp_path, monkeypatch):
    """The launcher's OpenAIServer, with the key in the launcher's environment, in front of the test
    server's Triton."""
    key, port, lines = secrets.token_urlsafe(24), free_port(), []
    monkeypatch.setenv("NVEMBED_API_KEY", key)
    settings = ServerSettings(tmp_path, (PUBLIC_MODEL,), tmp_path, grpc_port=int(api.url.rsplit(":", 1)[1]))
    front = OpenAIServer(settings, PUBLIC_MODEL, port, log=lines.append)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(type("Front", (), {"openai_port": port}), timeout_s=30)
        assert key not in " ".join(psutil.Process(front.process.pid).cmdline())  # visible to every local user
        response = OpenAI(base_url=base + "/v1", api_key=key).embeddings.create(model=PUBLIC_MODEL, input=TEXTS)
        with api.client() as grpc:
            expected = embed_documents(grpc, PUBLIC_MODEL, TEXTS)
        assert np.all(cosine(np.array([d.embedding for d in response.data]), expected) >= MATCH)
        for wrong in ("x" + key, key[:-1], key.upper() if key.upper() != key else key.lower()):
            with pytest.raises(openai.AuthenticationError) as raised:
                OpenAI(base_url=base + "/v1", api_key=wrong, max_retries=0).embeddings.create(model=PUBLIC_MODEL, input="hi")
            assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        for path, data in (("/v1/embeddings", json.dumps({"model": PUBLIC_MODEL, "input": "hi"}).encode()), ("/v1/models", None)):
            with pytest.raises(urllib.error.HTTPError) as raised:  # no Authorization header at all
                urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=30)
            assert raised.value.code == 401 and json.loads(raised.value.read())["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/openapi.json"):
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(base + path, timeout=30)
            assert raised.value.code == 401, path
            request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200 and json.loads(answer.read()), path
        for path in ("/health", "/v1/health/ready"):  # probes carry no key
            with urllib.request.urlopen(base + path, timeout=30) as answer:
                assert answer.status == 200
    finally:
        front.stop()
    assert front.process.returncode == 0 and not lines, lines  # a clean stop, not a crash to restart from
    assert not any(key in line for line in lines)


def test_without_a_key_the_schema_is_served_and_no_docs_page_is(api):
    with urllib.request.urlopen(api.openai_url.removesuffix("/v1") + "/openapi.json", timeout=30) as answer:
        assert "/v1/embeddings" in json.loads(answer.read())["paths"]
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(api.openai_url.removesuffix("/v1") + "/docs", timeout=30)
    assert raised.value.code == 404


# --- connections that send nothing -----------------------------------------------------------------


def test_idle_and_trickling_connections_are_closed_and_never_deny_the_api(api):
    """1,000 connections that send nothing and one that sends its request line a byte a second: each
    is closed within a few seconds, and meanwhile a client is answered as usual (before: 300 idle
    connections got everyone 503 until they closed)."""
    import resource

    from nvembed_triton.openai_api.app import IDLE_CONNECTION_S

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port = api.openai_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(1000)]
    trickling = socket.create_connection(("127.0.0.1", port), timeout=30)
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n":
            if stop.wait(1.0):
                return
            try:
                trickling.send(bytes([byte]))
            except OSError:  # closed by the server: what this test waits for
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        answer = OpenAI(base_url=api.openai_url, api_key="not-needed", max_retries=0).embeddings.create(
            model=PUBLIC_MODEL, input=TEXTS
        )
        assert len(answer.data) == len(TEXTS)
        answered_s = time.monotonic() - opened
        for connection in [*idle, trickling]:
            connection.settimeout(IDLE_CONNECTION_S + 10)
            try:
                assert connection.recv(1) == b""  # closed by the server
            except ConnectionResetError:
                pass
        closed_s = time.monotonic() - opened
    finally:
        stop.set()
        sender.join()
        for connection in [*idle, trickling]:
            connection.close()
    print(f"answered {answered_s:.1f} s after 1,001 idle connections opened; all closed after {closed_s:.1f} s")
    assert answered_s < IDLE_CONNECTION_S and closed_s < IDLE_CONNECTION_S + 5


# --- large query batches -------------------------------------------------------------------------

QUERIES = [f"question {i}: how long does dough number {i % 97} rise?" for i in range(2048)]


@pytest.fixture(scope="module")
def queries_one_by_one(api) -> np.ndarray:
    """QUERIES through the gRPC contract's `query` input, one request each: the reference."""
    local, clients = threading.local(), []

    def one(text: str) -> np.ndarray:
        if not hasattr(local, "grpc"):  # one client per thread
            local.grpc = api.client()
            clients.append(local.grpc)
        return embed_query(local.grpc, PUBLIC_MODEL, text)[0]

    with ThreadPoolExecutor(8) as pool:
        vectors = np.stack(list(pool.map(one, QUERIES)))
    for client in clients:
        client.close()
    return vectors


def public_requests_served(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return sum(
        sample.value
        for family in families
        if family.name == "nv_inference_request_success"
        for sample in family.samples
        if sample.labels.get("model") == PUBLIC_MODEL
    )


def test_2048_queries_in_one_http_request_succeed_on_an_idle_server(api, queries_one_by_one):
    """Once 429 always: each query was its own Triton request, all sent at once."""
    before = public_requests_served(api)
    client = OpenAI(base_url=api.openai_url, api_key="not-needed", max_retries=0)
    response = client.embeddings.create(
        model=PUBLIC_MODEL, input=QUERIES, encoding_format="float", extra_body={"input_type": "query"}
    )
    requests = public_requests_served(api) - before
    vectors = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
    assert np.all(cosine(vectors, queries_one_by_one) >= MATCH)
    assert requests < len(QUERIES) / 10, f"{requests} Triton requests for {len(QUERIES)} queries"


def test_the_python_client_sends_a_list_of_queries_as_chunks(api, queries_one_by_one):
    before = public_requests_served(api)
    with EmbeddingClient(api.url) as client:
        vectors = client.encode(QUERIES, prompt_name=contract.QUERY_PROMPT)
        single = client.encode(QUERIES[5], prompt_name=contract.QUERY_PROMPT)  # one str: the `query` input
    requests = public_requests_served(api) - before
    assert np.all(cosine(vectors, queries_one_by_one) >= MATCH) and cosine(single, queries_one_by_one[5]) >= MATCH
    assert requests < len(QUERIES) / 10, f"{requests} Triton requests for {len(QUERIES)} queries"


def test_the_prompt_name_parameter_through_raw_tritonclient(api, queries_one_by_one):
    texts = QUERIES[:40]
    outputs = [grpcclient.InferRequestedOutput(contract.EMBEDDINGS_OUTPUT)]

    def documents(grpc, **parameters) -> np.ndarray:
        inputs = [bytes_input(contract.DOCUMENTS_INPUT, texts, [1, len(texts)])]
        return grpc.infer(PUBLIC_MODEL, inputs, outputs=outputs, parameters=parameters).as_numpy(contract.EMBEDDINGS_OUTPUT)

    with api.client() as grpc:
        assert np.all(cosine(documents(grpc, prompt_name="query"), queries_one_by_one[:40]) >= MATCH)
        assert np.all(cosine(documents(grpc, prompt_name="document"), documents(grpc)) >= MATCH)
        mine = documents(grpc, instruction="Instruct: find recipes\nQuery: ")  # an explicit instruction still wins
        assert np.all(cosine(documents(grpc, prompt_name="query", instruction="Instruct: find recipes\nQuery: "), mine) >= MATCH)
        assert np.all(cosine(mine, queries_one_by_one[:40]) < 0.9999)
        for bad in ("passage", "QUERY", ""):
            with pytest.raises(InferenceServerException) as raised:
                documents(grpc, prompt_name=bad)
            assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and "prompt_name" in raised.value.message()
