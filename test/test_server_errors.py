"""Bad input through the real server: each gets INVALID_ARGUMENT with a message naming the problem,
and the server answers the next good request."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_helpers import bytes_input, embed_query, infer
from tritonclient.utils import InferenceServerException

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL, encoder_model_name

pytestmark = pytest.mark.server  # starts real tritonservers

ENCODER = encoder_model_name(PUBLIC_MODEL)


def documents(values):
    return [bytes_input(contract.DOCUMENTS_INPUT, [values], [1, len(values)])]


def query(value):
    return [bytes_input(contract.QUERY_INPUT, [value], [1])]


def empty_documents():
    tensor = grpcclient.InferInput(contract.DOCUMENTS_INPUT, [1, 0], "BYTES")
    tensor.set_data_from_numpy(np.empty((1, 0), dtype=object))
    return [tensor]


CASES = {
    "both inputs": (lambda: query("q") + documents(["d"]), PUBLIC_MODEL, ["not both"]),
    "neither input": (lambda: [], PUBLIC_MODEL, ["query", "documents"]),
    "empty documents list": (empty_documents, PUBLIC_MODEL, ["documents is empty", "1 and 1024"]),
    "empty document": (lambda: documents(["fine", ""]), PUBLIC_MODEL, ["documents[1]", "empty string"]),
    "empty query": (lambda: query(""), PUBLIC_MODEL, ["query[0]", "empty string"]),
    "non-UTF-8 document": (lambda: documents([b"ok", b"caf\xe9"]), PUBLIC_MODEL, ["documents[1]", "UTF-8"]),
    "non-UTF-8 query": (lambda: query(b"\xff\xfe"), PUBLIC_MODEL, ["query[0]", "UTF-8"]),
    "too many documents": (lambda: documents(["d"] * 1025), PUBLIC_MODEL, ["1025", "at most 1024", "max_documents"]),
    "query with two texts": (lambda: [bytes_input(contract.QUERY_INPUT, ["a", "b"], [2])], PUBLIC_MODEL, ["query"]),
    "unknown prompt_name (encoder)": (
        lambda: [bytes_input(contract.TEXT_INPUT, ["t"], [1, 1]), bytes_input(contract.PROMPT_NAME_INPUT, ["passage"], [1, 1])],
        ENCODER,
        ["prompt_name", "'query'", "'document'", "'passage'"],
    ),
    "instruction longer than max_length (encoder)": (
        lambda: [
            bytes_input(contract.TEXT_INPUT, ["t"], [1, 1]),
            bytes_input(contract.INSTRUCTION_INPUT, ["word " * 400], [1, 1]),
        ],
        ENCODER,
        ["instruction", "max_length 256"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_clearly_and_server_stays_healthy(nvembed_server, case):
    make_inputs, model, expected_phrases = CASES[case]
    with nvembed_server.client() as client:
        with pytest.raises(InferenceServerException) as raised:
            infer(client, model, make_inputs())
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value
        for phrase in expected_phrases:
            assert phrase in raised.value.message(), raised.value.message()
        assert nvembed_server.is_healthy()
        assert embed_query(client, PUBLIC_MODEL, "still working?").shape == (1, 64)


def test_a_bad_request_does_not_fail_good_ones_batched_with_it(nvembed_server):
    """The encoder answers each request of a dynamic batch on its own."""
    from concurrent.futures import ThreadPoolExecutor

    def good():
        return [bytes_input(contract.TEXT_INPUT, ["good text", "another"], [1, 2])]

    def bad():
        return [bytes_input(contract.TEXT_INPUT, ["fine", b"\xff"], [1, 2])]

    def call(make_inputs):
        with nvembed_server.client() as client:
            try:
                return infer(client, ENCODER, make_inputs())
            except InferenceServerException as error:
                return error

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, [good, bad] * 8))
    for make_inputs, outcome in zip([good, bad] * 8, outcomes, strict=True):
        if make_inputs is good:
            assert isinstance(outcome, np.ndarray) and outcome.shape == (1, 2, 64)
        else:
            assert isinstance(outcome, InferenceServerException) and "text[0][1]" in outcome.message()
