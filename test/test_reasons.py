"""reasons.REASONS is the one table of why a request failed: the models' codes, the clients'
retries and the OpenAI API's statuses all come from it, and Triton's message texts map to it."""

import pytest
from tritonclient.utils import InferenceServerException

from nvembed_triton.clients.client import _is_retryable
from nvembed_triton.clients.openai_api import as_api_error
from nvembed_triton.protocol.errors import EmbeddingError
from nvembed_triton.protocol.reasons import REASONS, reason_of

TRITON_ERROR_CODES = {"INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL", "NOT_FOUND", "UNSUPPORTED", "ALREADY_EXISTS"}


def test_every_reason_has_a_code_a_status_and_a_retry_rule():
    for reason in REASONS.values():
        assert reason.triton_code in TRITON_ERROR_CODES
        assert 400 <= reason.http_status < 600 and reason.openai_type in ("invalid_request_error", "server_error")
    assert [name for name, reason in REASONS.items() if reason.retry] == ["over_capacity", "shutting_down", "unavailable"]


@pytest.mark.parametrize(
    "message, status, expected",
    [
        ("invalid_input: documents[1] is an empty string", "StatusCode.INTERNAL", "invalid_input"),  # restored after BLS
        ("[request id: <id_unknown>] Exceeds maximum queue size", "StatusCode.UNAVAILABLE", "over_capacity"),
        ("Stub process 'nv-embed-v2_0_3' is not healthy.", "StatusCode.INTERNAL", "unavailable"),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", "unavailable"),
        ("unexpected shape for input 'query'", "StatusCode.INVALID_ARGUMENT", "invalid_input"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", "internal"),
        # a tritonserver stopping (seen when a replica's serve.sh is killed mid-run, test_corpus)
        ("Request for unknown model: 'nv-embed-v2' has no available versions", "StatusCode.NOT_FOUND", "shutting_down"),
        ("Request for unknown model: 'nv-embed-v3' is not found", "StatusCode.NOT_FOUND", "internal"),  # a wrong name
        # the public model's forwarded request while that tritonserver stops (test_corpus, once in a CI run)
        ("Model nv-embed-v2-encoder - Error when running inference: Server not ready", "StatusCode.INTERNAL", "shutting_down"),
        ("CANCELLED", "StatusCode.CANCELLED", "shutting_down"),  # tritonserver cancels what it holds as it stops
        ("cancelled: the client went away", "StatusCode.CANCELLED", "cancelled"),  # our models' own
        ("something else", None, "internal"),
    ],
)
def test_tritons_and_grpcs_messages_map_to_reasons(message, status, expected):
    assert reason_of(message, status).name == expected
    assert _is_retryable(InferenceServerException(message, status=status)) is REASONS[expected].retry


@pytest.mark.parametrize("name", list(REASONS))
def test_the_openai_api_answers_each_reason_with_its_status(name):
    error = as_api_error(EmbeddingError(f"{name}: why", "UNAVAILABLE", name))
    assert error.status == REASONS[name].http_status
