"""NV-Embed-v2 through the real server (tiny random checkpoint, CPU): the contract's shapes and
types, and equality with an independent fp32 implementation of what the model computes."""

import numpy as np
import pytest
from conftest import TEST_MAX_LENGTH
from grpc_helpers import cosine, embed_documents, embed_query
from nvembed_reference import ReferenceNVEmbed
from texts import AWKWARD
from texts import DOCUMENTS as README_DOCUMENTS

from nvembed_triton.protocol.contract import PUBLIC_MODEL, RETRIEVAL_TASK, nvembed_query_instruction

pytestmark = pytest.mark.server  # starts real tritonservers

QUERY_INSTRUCTION = nvembed_query_instruction(RETRIEVAL_TASK)
DOCUMENTS = README_DOCUMENTS + AWKWARD
MATCH = 0.99999


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceNVEmbed(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(nvembed_server):
    with nvembed_server.client() as client:
        yield client


def test_query_shape_dtype_norm(client):
    embeddings = embed_query(client, PUBLIC_MODEL, "How do neural networks learn patterns from examples?")
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (1, 64)
    assert abs(np.linalg.norm(embeddings[0]) - 1) < 1e-5


def test_documents_shape_dtype_norms(client):
    embeddings = embed_documents(client, PUBLIC_MODEL, DOCUMENTS)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (len(DOCUMENTS), 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


def test_query_matches_independent_implementation_with_instruction(client, reference):
    text = "How do neural networks learn patterns from examples?"
    served = embed_query(client, PUBLIC_MODEL, text)[0]
    assert cosine(served, reference.embed(text, QUERY_INSTRUCTION)) >= MATCH
    # The instruction matters: the same text as a document is a different vector.
    assert cosine(served, reference.embed(text, "")) < 0.999


def test_documents_match_independent_implementation(client, reference):
    served = embed_documents(client, PUBLIC_MODEL, DOCUMENTS)
    expected = np.stack([reference.embed(text) for text in DOCUMENTS])
    assert np.all(cosine(served, expected) >= MATCH)


def test_text_alone_equals_text_batched_with_longer_ones(client):
    short = "A short text."
    longer = ["word " * 150, "another much longer document " * 20, short]
    alone = embed_documents(client, PUBLIC_MODEL, [short])[0]
    batched = embed_documents(client, PUBLIC_MODEL, longer)
    assert cosine(alone, batched[2]) >= MATCH
    assert cosine(batched[0], batched[2]) < 0.999  # different texts stay different


def test_order_is_kept(client):
    forward = embed_documents(client, PUBLIC_MODEL, DOCUMENTS)
    backward = embed_documents(client, PUBLIC_MODEL, DOCUMENTS[::-1])
    assert np.all(cosine(forward, backward[::-1]) >= MATCH)


def test_text_longer_than_max_length_is_truncated_like_the_reference(client, reference):
    # The tail past max_length is different text, so keeping it would change the embedding.
    long_text = "tokens " * TEST_MAX_LENGTH + "market prices supply demand cookies flour sugar " * TEST_MAX_LENGTH
    served = embed_documents(client, PUBLIC_MODEL, [long_text])[0]
    assert cosine(served, reference.embed(long_text, max_length=TEST_MAX_LENGTH)) >= MATCH
    assert cosine(served, reference.embed(long_text, max_length=4 * TEST_MAX_LENGTH)) < 0.999
