"""The Python client against the real server: sentence-transformers conventions, order, chunking,
errors as Python exceptions, asyncio and LangChain flavours."""

import asyncio
import re
import socket
import time

import numpy as np
import pytest
import torch
from grpc_helpers import cosine, embed_documents, embed_query

from nvembed_triton.client.embedding_client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    EmbeddingError,
    InvalidInputError,
    ServerUnavailableError,
)
from nvembed_triton.protocol.contract import PUBLIC_MODEL

TEXTS = [f"document number {i} about {topic}" for i, topic in enumerate(["cats", "markets", "flour", "networks"] * 3)]


@pytest.fixture(scope="module")
def client(nvembed_server):
    with EmbeddingClient(nvembed_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def raw(nvembed_server):
    with nvembed_server.client() as raw:
        yield raw


def test_list_gives_rows_in_input_order_across_chunks(client, raw):
    embeddings = client.encode(TEXTS, batch_size=5)  # 3 requests, sent concurrently
    assert isinstance(embeddings, np.ndarray) and embeddings.shape == (len(TEXTS), 64)
    assert np.all(cosine(embeddings, embed_documents(raw, PUBLIC_MODEL, TEXTS)) >= 0.99999)


def test_requests_stay_within_the_servers_max_documents(client, raw):
    """batch_size above the server's limit (1024): the client splits by the limit."""
    texts = [f"text {i}: " + "word " * (i % 7) for i in range(1100)]
    embeddings = client.encode(texts, batch_size=5000)
    assert embeddings.shape == (1100, 64)
    alone = np.stack([embed_documents(raw, PUBLIC_MODEL, [t])[0] for t in texts[::13]])
    assert np.all(cosine(embeddings[::13], alone) >= 0.99999)


def test_unknown_model_is_an_embedding_error_with_its_status(nvembed_server):
    with EmbeddingClient(nvembed_server.url, model="no-such-model") as client, pytest.raises(EmbeddingError) as raised:
        client.encode(["x"], prompt_name="query")
    assert raised.value.status == "NOT_FOUND" and "no-such-model" in str(raised.value)


def test_str_gives_one_vector(client, raw):
    vector = client.encode("a single text")
    assert vector.shape == (64,)
    assert cosine(vector, embed_documents(raw, PUBLIC_MODEL, ["a single text"])[0]) >= 0.99999


def test_query_prompt_uses_the_query_input(client, raw):
    queries = client.encode(TEXTS[:4], prompt_name="query")
    expected = np.stack([embed_query(raw, PUBLIC_MODEL, t)[0] for t in TEXTS[:4]])
    assert np.all(cosine(queries, expected) >= 0.99999)
    assert np.all(cosine(queries, client.encode(TEXTS[:4])) < 0.9999)  # documents differ from queries


def test_tensor_and_list_outputs_follow_sentence_transformers(client):
    tensor = client.encode(TEXTS[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (3, 64)
    as_list = client.encode(TEXTS[:3], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 3 and tuple(as_list[0].shape) == (64,)
    assert client.encode([]).shape == (0,)


def test_embeddings_are_unit_vectors_either_way(client):
    for normalize in (True, False):
        embeddings = client.encode(TEXTS[:3], normalize_embeddings=normalize)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


def test_langchain_protocol_methods(client):
    query = client.embed_query("what is flour?")
    documents = client.embed_documents(TEXTS[:2])
    assert isinstance(query, list) and len(query) == 64 and isinstance(query[0], float)
    assert len(documents) == 2 and len(documents[0]) == 64


def test_unknown_prompt_name_lists_the_choices(client):
    with pytest.raises(ValueError, match="'query', 'document'"):
        client.encode(["x"], prompt_name="passage")


def test_server_rejection_is_a_clear_exception_naming_the_texts(client):
    with pytest.raises(InvalidInputError) as raised:
        client.encode(["fine", "", "also fine"], batch_size=2)
    assert "texts 0..1" in str(raised.value) and "documents[1] is an empty string" in str(raised.value)


def test_progress_bar_counts_texts(client, capsys):
    client.encode(TEXTS, batch_size=4, show_progress_bar=True)
    assert f"{len(TEXTS)}/{len(TEXTS)}" in capsys.readouterr().err


def test_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    started = time.monotonic()
    with EmbeddingClient(f"localhost:{port}", max_retries=2) as client, pytest.raises(ServerUnavailableError):
        client.encode(["x"])
    assert time.monotonic() - started >= 0.1 + 0.2  # two backoffs happened


def test_async_client_matches_the_blocking_one(nvembed_server, client):
    async def run():
        async with AsyncEmbeddingClient(nvembed_server.url) as aclient:
            documents = await aclient.encode(TEXTS, batch_size=5)
            query = await aclient.embed_query("what is flour?")
            return documents, query

    documents, query = asyncio.run(run())
    assert np.all(cosine(documents, client.encode(TEXTS)) >= 0.99999)
    assert np.all(cosine(asyncio.run(run())[0], documents) >= 0.99999)  # a second event loop works too
    assert cosine(np.array(query), np.array(client.embed_query("what is flour?"))) >= 0.99999


def test_langchain_adapter(nvembed_server, client):
    from langchain_core.embeddings import Embeddings

    from nvembed_triton.client.langchain import NVEmbedTritonEmbeddings

    embeddings = NVEmbedTritonEmbeddings(nvembed_server.url)
    assert isinstance(embeddings, Embeddings)
    assert cosine(np.array(embeddings.embed_query("q?")), np.array(client.embed_query("q?"))) >= 0.99999
    assert len(asyncio.run(embeddings.aembed_documents(TEXTS[:3]))) == 3


def test_sentence_transformers_encode_query_and_encode_document(nvembed_server):
    with EmbeddingClient(nvembed_server.url) as client:
        assert np.all(cosine(client.encode_query(TEXTS[:3]), client.encode(TEXTS[:3], prompt_name="query")) >= 0.99999)
        assert np.all(cosine(client.encode_document(TEXTS[:3]), client.encode(TEXTS[:3])) >= 0.99999)
        assert np.all(cosine(client.encode_query(TEXTS[:3]), client.encode_document(TEXTS[:3])) < 0.9999)

    async def both():
        async with AsyncEmbeddingClient(nvembed_server.url) as client:
            return await client.encode_query(TEXTS[:2]), await client.encode_document(TEXTS[:2])

    query, document = asyncio.run(both())
    with EmbeddingClient(nvembed_server.url) as client:
        assert np.all(cosine(query, client.encode_query(TEXTS[:2])) >= 0.99999)
        assert np.all(cosine(document, client.encode_document(TEXTS[:2])) >= 0.99999)


@pytest.mark.parametrize("flavour", ["EmbeddingClient", "AsyncEmbeddingClient"])
def test_the_progress_bar_is_one_bar_that_ends_at_100_percent(nvembed_server, flavour):
    """show_progress_bar: one bar, counting texts, that only moves forward and ends at all of them."""
    import subprocess
    import sys

    call = "c.encode(texts, batch_size=5, show_progress_bar=True)"
    code = (
        f"import asyncio\nfrom nvembed_triton.client import {flavour}\ntexts = [f'text {{i}}' for i in range(40)]\n"
        + (f"with EmbeddingClient('{nvembed_server.url}') as c: {call}\n" if flavour == "EmbeddingClient" else
           f"async def main():\n    async with AsyncEmbeddingClient('{nvembed_server.url}') as c: await {call}\n"
           "asyncio.run(main())\n")
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # tqdm redraws its line (\r) as it goes, and once more on close: read the states it drew.
    counts = [int(count) for count in re.findall(r"(\d+)/40", result.stderr)]
    assert counts.count(0) == 1, result.stderr  # one bar was started
    assert counts == sorted(counts) and counts[-1] == 40, result.stderr  # it only moved forward, to 40 of 40
