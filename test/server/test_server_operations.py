"""Operating the server like TEI or a NIM: bounded capacity that refuses fast when full, usage on
every response that asks for it, and metrics that count what happened."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import TEST_MAX_LENGTH
from grpc_helpers import bytes_input, cosine, embed_documents, embed_query
from nvembed_reference import ReferenceNVEmbed
from server_processes import scrape_metrics
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from nvembed_triton.client.embedding_client import EmbeddingClient, InvalidInputError
from nvembed_triton.launcher.serve import closed_flag
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import (
    EMBEDDINGS_OUTPUT,
    PUBLIC_MODEL,
    RETRIEVAL_TASK,
    TOKEN_COUNTS_OUTPUT,
    TRUNCATED_OUTPUT,
    nvembed_query_instruction,
)
from nvembed_triton.settings import model_settings, triton_parameters

pytestmark = pytest.mark.server  # starts real tritonservers

# A long request (~75 KB of text: the long lane) and a short one (~15 KB: the short lane), each a
# few forward passes of the tiny model.
DOCUMENTS = [f"document {i} " + "bread flour yeast water salt " * 40 for i in range(64)]
SHORT_DOCUMENTS = DOCUMENTS[:12]
FULL = "exceeds maximum queue size"  # what a full model says (Triton's words for a full queue)


def held_requests(server) -> int:
    """What the server's model holds at once (max_held_requests), read from the model config the
    server serves."""
    with server.client() as client:
        config = client.get_model_config(PUBLIC_MODEL, as_json=True)["config"]
    return model_settings(triton_parameters(config), {})["max_held_requests"]


def burst(server, texts: list[str], size: int) -> tuple[list, list]:
    """`size` requests at once: (the embeddings served, the (error, seconds) of those refused)."""

    def one(_):
        started = time.monotonic()
        with server.client() as client:
            try:
                return embed_documents(client, PUBLIC_MODEL, texts), time.monotonic() - started
            except InferenceServerException as error:
                return error, time.monotonic() - started

    with ThreadPoolExecutor(size) as pool:
        outcomes = list(pool.map(one, range(size)))
    served = [result for result, _ in outcomes if isinstance(result, np.ndarray)]
    refused = [(error, seconds) for error, seconds in outcomes if isinstance(error, InferenceServerException)]
    assert len(served) + len(refused) == size
    return served, refused


def measured_burst(server, documents: list[str], size: int = 64):
    """What the server holds, the expected vectors, and a burst of `size` requests: (held, expected,
    served, refused, milliseconds to refuse, sorted)."""
    held = held_requests(server)
    with server.client() as client:
        expected = embed_documents(client, PUBLIC_MODEL, documents)
    served, refused = burst(server, documents, size)
    return held, expected, served, refused, sorted(seconds * 1e3 for _, seconds in refused)


def test_a_burst_of_long_requests_over_the_long_lane_is_refused_fast_and_the_rest_is_served(small_capacity_server):
    """The long lane holds half of what the model holds: the rest of a burst of long requests is
    refused at once (never queued behind them, where short requests would wait too)."""
    size = 64
    held, expected, served, refused, reject_ms = measured_burst(small_capacity_server, DOCUMENTS, size)
    print(f"burst of {size} long requests (long lane {held // 2}): {len(served)} served, {len(refused)} refused; "
          f"time to refuse p50 {reject_ms[len(reject_ms) // 2]:.0f} ms, max {reject_ms[-1]:.0f} ms")  # fmt: skip
    assert len(refused) >= size - held // 2 - 8, len(refused)  # a few more are served as the first ones finish
    messages = {(str(e.status()), e.message()[:160]) for e, _ in refused}
    # Refused by the long lane, or by the model as a whole while the long lane holds its half.
    assert all("UNAVAILABLE" in str(e.status()) and FULL in e.message().lower() for e, _ in refused), messages
    assert any("long lane is full" in e.message() for e, _ in refused), messages
    assert reject_ms[len(reject_ms) // 2] < 500 and reject_ms[-1] < 3000  # the slowest ones wait for a loaded machine
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in served)
    with small_capacity_server.client() as client:
        assert embed_query(client, PUBLIC_MODEL, "healthy afterwards").shape[0] == 1


def test_a_burst_over_what_the_model_holds_is_refused_at_once(small_capacity_server):
    """Short requests take every place the model has; the rest are refused at once, and every
    refusal says so."""
    size = 64
    held, expected, served, refused, reject_ms = measured_burst(small_capacity_server, SHORT_DOCUMENTS, size)
    print(f"burst of {size} short requests ({held} held): {len(served)} served, {len(refused)} refused, "
          f"p50 {reject_ms[len(reject_ms) // 2]:.0f} ms to refuse")
    assert len(refused) >= size // 2, len(refused)  # arrivals outpace the passes of what is held
    assert all("UNAVAILABLE" in str(e.status()) and FULL in e.message().lower() for e, _ in refused)
    assert "max_held_requests" in refused[0][0].message()
    assert reject_ms[len(reject_ms) // 2] < 500
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in served)


def test_a_full_model_is_not_mistaken_for_a_broken_server(small_capacity_server):
    """Overload for longer than serve.sh's probe interval: its probe meets a model holding all it
    can, and must not restart the server (which would drop the work it holds)."""
    from nvembed_triton.launcher.supervisor import Timings

    held = held_requests(small_capacity_server)
    deadline = time.monotonic() + Timings.health_interval_s * 1.6
    refusals = []

    def overload(_):
        with small_capacity_server.client() as client:
            while time.monotonic() < deadline:
                try:
                    embed_documents(client, PUBLIC_MODEL, SHORT_DOCUMENTS)
                except InferenceServerException as error:
                    refusals.append(FULL in error.message().lower())

    before = small_capacity_server.console_path.read_text()
    with ThreadPoolExecutor(4 * held) as pool:
        list(pool.map(overload, range(4 * held)))
    assert any(refusals), "the model never filled"
    assert "restarting" not in small_capacity_server.console_path.read_text()[len(before) :]
    with small_capacity_server.client() as client:
        assert embed_query(client, PUBLIC_MODEL, "still the same server").shape[0] == 1


def test_the_python_client_rides_out_a_full_model(small_capacity_server, monkeypatch):
    """Its retries with backoff turn refusals into later successes (the retries are counted)."""
    from nvembed_triton.client import embedding_client as client_module

    retries, backoff = [], client_module._backoff_s
    monkeypatch.setattr(client_module, "_backoff_s", lambda failures: retries.append(failures) or backoff(failures))
    held = held_requests(small_capacity_server)
    concurrency = 4 * held
    with EmbeddingClient(small_capacity_server.url, max_concurrency=concurrency) as client:
        expected = client.encode(SHORT_DOCUMENTS)
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: client.encode(SHORT_DOCUMENTS), range(2 * concurrency)))
    assert all(np.all(cosine(r, expected) >= 0.99999) for r in results)
    assert retries, "no request was refused: the model never filled"


# --- usage and metrics -----------------------------------------------------------------------------


def token_count(tiny_checkpoint, text: str) -> tuple[int, bool]:
    """Independently: the tokenizers library on text + EOS, BOS added, cut at TEST_MAX_LENGTH."""
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    length = len(tokenizer.encode(text + "</s>").ids)
    return min(length, TEST_MAX_LENGTH), length > TEST_MAX_LENGTH


def scrape(server) -> dict[tuple, float]:
    return scrape_metrics(server.metrics_port)


def settled(read, done, timeout_s: float = 5.0):
    """read() again until done(value) or timeout_s has passed; the last value."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


USAGE_TEXTS = ["a short document", "another one about bread", "flour " * (TEST_MAX_LENGTH * 2)]


def test_usage_comes_on_request_and_matches_the_tokenizer(nvembed_server, tiny_checkpoint):
    outputs = [grpcclient.InferRequestedOutput(name) for name in (EMBEDDINGS_OUTPUT, TOKEN_COUNTS_OUTPUT, TRUNCATED_OUTPUT)]
    inputs = [bytes_input(contract.DOCUMENTS_INPUT, [USAGE_TEXTS], [1, 3])]
    with nvembed_server.client() as client:
        result = client.infer(PUBLIC_MODEL, inputs, outputs=outputs)
        only_embeddings = client.infer(PUBLIC_MODEL, inputs, outputs=outputs[:1])
    expected = [token_count(tiny_checkpoint, text) for text in USAGE_TEXTS]
    assert result.as_numpy(TOKEN_COUNTS_OUTPUT).tolist() == [count for count, _ in expected]
    assert result.as_numpy(TRUNCATED_OUTPUT).tolist() == [False, False, True]
    assert only_embeddings.as_numpy(TOKEN_COUNTS_OUTPUT) is None  # the seed's clients see nothing new
    assert np.allclose(only_embeddings.as_numpy(EMBEDDINGS_OUTPUT), result.as_numpy(EMBEDDINGS_OUTPUT))


def test_metrics_count_texts_tokens_passes_and_rejections(nvembed_server, tiny_checkpoint):
    """Exact differences over a known sequence (serve.sh's health probes are queries, so only
    document counts are exact)."""
    model = PUBLIC_MODEL
    before = scrape(nvembed_server)
    with nvembed_server.client() as client:
        embed_documents(client, PUBLIC_MODEL, USAGE_TEXTS)
        embed_documents(client, PUBLIC_MODEL, USAGE_TEXTS[:1])
        for bad in ([""], ["fine", b"caf\xe9"]):
            with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|empty|UTF-8"):
                embed_documents(client, PUBLIC_MODEL, bad)
    counts = [token_count(tiny_checkpoint, text) for text in USAGE_TEXTS + USAGE_TEXTS[:1]]

    def observed(after):
        return (
            delta(before, after, "nvembed_texts_total", model=model, prompt="document"),
            delta(before, after, "nvembed_tokens_total", model=model, prompt="document"),
            delta(before, after, "nvembed_truncated_texts_total", model=model),
            delta(before, after, "nvembed_rejected_requests_total", model=model, reason="invalid_input"),
        )

    # Each stub sends its metrics a moment after the responses (metrics.SEND_INTERVAL_S).
    after = settled(lambda: scrape(nvembed_server), lambda after: observed(after) == (4, sum(c for c, _ in counts), 1, 2))
    assert delta(before, after, "nvembed_texts_total", model=model, prompt="document") == 4
    assert delta(before, after, "nvembed_tokens_total", model=model, prompt="document") == sum(c for c, _ in counts)
    assert delta(before, after, "nvembed_truncated_texts_total", model=model) == 1
    assert delta(before, after, "nvembed_rejected_requests_total", model=model, reason="invalid_input") == 2
    passes = delta(before, after, "nvembed_forward_passes_total", model=model)
    assert passes >= 2  # two requests, not batched together: they were sent one after the other
    assert delta(before, after, "nvembed_padded_tokens_total", model=model) >= sum(c for c, _ in counts)


def rejected(server, reason: str) -> float:
    return scrape(server).get(("nvembed_rejected_requests_total", (("model", PUBLIC_MODEL), ("reason", reason))), 0.0)


def test_each_refusal_is_counted_under_its_reason(small_capacity_server):
    """Every reason a request can meet from outside, each counted once under its own label (the
    model's counters lag by its send interval). internal and unavailable need a fault or an unload."""
    server = small_capacity_server

    def counted(reason: str, event) -> None:
        before = rejected(server, reason)
        event()
        after = settled(lambda: rejected(server, reason), lambda value: value > before)
        assert after > before, reason

    def invalid():
        with server.client() as client, pytest.raises(InferenceServerException, match="empty string"):
            embed_documents(client, PUBLIC_MODEL, [""])

    def cancelled():
        with server.client() as client, pytest.raises(InferenceServerException, match="timeout passed"):
            client.infer(PUBLIC_MODEL, [bytes_input(contract.DOCUMENTS_INPUT, [DOCUMENTS * 16], [1, 1024])], timeout=50_000)

    def over_capacity():  # more long requests at once than the long lane holds
        burst(server, DOCUMENTS, 32)

    def shutting_down():  # the door a drain closes, closed by hand (and opened again)
        door = closed_flag(server.log_path.parent)
        door.touch()
        try:
            with server.client() as client, pytest.raises(InferenceServerException, match="shutting down"):
                embed_query(client, PUBLIC_MODEL, "too late")
        finally:
            door.unlink()

    counted("invalid_input", invalid)
    counted("cancelled", cancelled)
    counted("over_capacity", over_capacity)
    counted("shutting_down", shutting_down)


# --- per-request options -----------------------------------------------------------------------------

LONG_TEXT = " ".join(f"word{i}" for i in range(TEST_MAX_LENGTH * 2))  # about 4x max_length tokens
QUERY_INSTRUCTION = nvembed_query_instruction(RETRIEVAL_TASK)
STS_INSTRUCTION = "Instruct: Retrieve semantically similar text.\nQuery: "


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceNVEmbed(tiny_checkpoint)


def infer_with(server, input_name: str, texts: list[str], **parameters) -> np.ndarray:
    shape = [1] if input_name == contract.QUERY_INPUT else [1, len(texts)]
    with server.client() as client:
        tensor = bytes_input(input_name, texts if shape == [1] else [texts], shape)
        result = client.infer(PUBLIC_MODEL, [tensor], parameters=parameters)
    return result.as_numpy(EMBEDDINGS_OUTPUT)


def test_a_custom_instruction_per_request(nvembed_server, reference):
    served = infer_with(nvembed_server, contract.QUERY_INPUT, ["what is flour?"], instruction=STS_INSTRUCTION)
    assert cosine(served, reference.embed("what is flour?", STS_INSTRUCTION, TEST_MAX_LENGTH)) >= 0.99999
    default = infer_with(nvembed_server, contract.QUERY_INPUT, ["what is flour?"])
    assert cosine(served, default) < 0.9999  # the instruction took effect


@pytest.mark.parametrize("input_name", [contract.DOCUMENTS_INPUT, contract.QUERY_INPUT])
def test_truncate_start_keeps_the_end(nvembed_server, reference, input_name):
    instruction = QUERY_INSTRUCTION if input_name == contract.QUERY_INPUT else ""
    served = infer_with(nvembed_server, input_name, [LONG_TEXT], truncate="START")
    assert cosine(served, reference.embed(LONG_TEXT, instruction, TEST_MAX_LENGTH, keep_end=True)) >= 0.99999
    end = infer_with(nvembed_server, input_name, [LONG_TEXT], truncate="end")
    assert cosine(end, reference.embed(LONG_TEXT, instruction, TEST_MAX_LENGTH)) >= 0.99999
    assert cosine(served, end) < 0.9999


def test_truncate_none_refuses_an_over_long_text_naming_it(nvembed_server, tiny_checkpoint):
    short = infer_with(nvembed_server, contract.DOCUMENTS_INPUT, ["short"], truncate="NONE")
    assert short.shape[0] == 1
    with pytest.raises(InferenceServerException) as raised:
        infer_with(nvembed_server, contract.DOCUMENTS_INPUT, ["short", LONG_TEXT], truncate="NONE")
    tokens = len(Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(LONG_TEXT + "</s>").ids)
    message = raised.value.message()
    assert "INVALID_ARGUMENT" in str(raised.value.status())
    assert f"text 1 is {tokens} tokens" in message and f"max_length {TEST_MAX_LENGTH}" in message


@pytest.mark.parametrize(
    "parameters,named",
    [({"truncate": "MIDDLE"}, ["truncate", "'END', 'START', 'NONE'", "MIDDLE"]), ({"colour": "blue"}, ["unknown", "colour"])],
)
def test_unknown_or_bad_parameters_are_refused_naming_them(nvembed_server, parameters, named):
    with pytest.raises(InferenceServerException) as raised:
        infer_with(nvembed_server, contract.DOCUMENTS_INPUT, ["text"], **parameters)
    assert "INVALID_ARGUMENT" in str(raised.value.status())
    assert all(word in raised.value.message() for word in named)


def test_the_python_client_sends_options_and_reads_usage(nvembed_server, tiny_checkpoint):
    with EmbeddingClient(nvembed_server.url) as client:
        custom = client.encode(["what is flour?"], prompt=STS_INSTRUCTION)
        start = client.encode([LONG_TEXT], truncate="START")
        usage = client.embed_with_usage(USAGE_TEXTS)
        with pytest.raises(InvalidInputError, match="truncate is NONE"):
            client.encode([LONG_TEXT], truncate="NONE")
    raw = infer_with(nvembed_server, contract.QUERY_INPUT, ["what is flour?"], instruction=STS_INSTRUCTION)
    assert cosine(custom, raw) >= 0.99999
    assert cosine(start, infer_with(nvembed_server, contract.DOCUMENTS_INPUT, [LONG_TEXT], truncate="START")) >= 0.99999
    assert usage.token_counts.tolist() == [token_count(tiny_checkpoint, text)[0] for text in USAGE_TEXTS]
    assert usage.truncated.tolist() == [False, False, True] and usage.embeddings.shape == (3, 64)


def test_options_work_for_sentence_transformers_models(minilm_server):
    from nvembed_triton.launcher.serve import DEMO_MODEL

    long_text = "bread " * 1000
    with EmbeddingClient(minilm_server.url, model=DEMO_MODEL) as client:
        end, start = client.encode([long_text + "the end"]), client.encode([long_text + "the end"], truncate="START")
        with pytest.raises(InvalidInputError, match="truncate is NONE"):
            client.encode([long_text], truncate="NONE")
        usage = client.embed_with_usage(["short text", long_text])
    assert cosine(end, start) < 0.9999  # START kept "the end", END did not
    assert usage.truncated.tolist() == [False, True] and usage.token_counts[1] == 256
