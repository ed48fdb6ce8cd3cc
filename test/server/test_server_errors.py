"""Bad input through the real server: each gets INVALID_ARGUMENT with a message naming the problem,
and the server answers the next good request."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_helpers import bytes_input, embed_query, infer
from tritonclient.utils import InferenceServerException

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL

pytestmark = pytest.mark.server  # starts real tritonservers


def documents(values):
    return [bytes_input(contract.DOCUMENTS_INPUT, [values], [1, len(values)])]


def query(value):
    return [bytes_input(contract.QUERY_INPUT, [value], [1])]


def empty_documents():
    tensor = grpcclient.InferInput(contract.DOCUMENTS_INPUT, [1, 0], "BYTES")
    tensor.set_data_from_numpy(np.empty((1, 0), dtype=object))
    return [tensor]


CASES = {  # inputs, request parameters, what the message names
    "both inputs": (lambda: query("q") + documents(["d"]), None, ["not both"]),
    "neither input": (lambda: [], None, ["query", "documents"]),
    "empty documents list": (empty_documents, None, ["documents is empty", "1 and 1024"]),
    "empty document": (lambda: documents(["fine", ""]), None, ["documents[1]", "empty string"]),
    "empty query": (lambda: query(""), None, ["query[0]", "empty string"]),
    "non-UTF-8 document": (lambda: documents([b"ok", b"caf\xe9"]), None, ["documents[1]", "UTF-8"]),
    "non-UTF-8 query": (lambda: query(b"\xff\xfe"), None, ["query[0]", "UTF-8"]),
    "too many documents": (lambda: documents(["d"] * 1025), None, ["1025", "at most 1024", "max_documents"]),
    "query with two texts": (lambda: [bytes_input(contract.QUERY_INPUT, ["a", "b"], [2])], None, ["query"]),
    "unknown prompt_name": (lambda: documents(["t"]), {"prompt_name": "passage"}, ["prompt_name", "'query'", "'passage'"]),
    "instruction longer than max_length": (lambda: query("t"), {"instruction": "word " * 400}, ["instruction", "max_length 256"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_clearly_and_server_stays_healthy(nvembed_server, case):
    make_inputs, parameters, expected_phrases = CASES[case]
    with nvembed_server.client() as client:
        with pytest.raises(InferenceServerException) as raised:
            infer(client, PUBLIC_MODEL, make_inputs(), parameters)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value
        for phrase in expected_phrases:
            assert phrase in raised.value.message(), raised.value.message()
        assert nvembed_server.is_healthy()
        assert embed_query(client, PUBLIC_MODEL, "still working?").shape == (1, 64)


def test_a_bad_request_does_not_fail_good_ones_batched_with_it(nvembed_server):
    """The model answers each request of a lane's batch on its own: a text over max_length with
    truncate NONE is refused in the same encode call that embeds the others."""
    from concurrent.futures import ThreadPoolExecutor

    def call(bad: bool):
        texts = ["fine", "word " * 400] if bad else ["good text", "another"]
        with nvembed_server.client() as client:
            try:
                return infer(client, PUBLIC_MODEL, documents(texts), {"truncate": "NONE"})
            except InferenceServerException as error:
                return error

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, [False, True] * 8))
    for bad, outcome in zip([False, True] * 8, outcomes, strict=True):
        if not bad:
            assert isinstance(outcome, np.ndarray) and outcome.shape == (2, 64)
        else:
            assert isinstance(outcome, InferenceServerException) and "text 1 is" in outcome.message()
