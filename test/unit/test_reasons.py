"""reasons.REASONS is the one table of why a request failed. What clients receive maps back to it
(reason_of), and each reason's consequences are written out here as a user sees them: whether the
Python client retries, what the OpenAI API answers, what the model answers with."""

import pytest

from nvembed_triton.openai_api.app import as_api_error
from nvembed_triton.protocol.errors import EmbeddingError
from nvembed_triton.protocol.lifecycle import CANCELLED_MESSAGE, CLOSED_MESSAGE, TIMEOUT_MESSAGE
from nvembed_triton.protocol.reasons import REASONS, UNAUTHORIZED_MESSAGE, reason_of


@pytest.mark.parametrize(
    "message, status, expected",
    [
        ("documents[1] is an empty string", "StatusCode.INVALID_ARGUMENT", "invalid_input"),
        (UNAUTHORIZED_MESSAGE + "; send the server's inference key in it", "StatusCode.INVALID_ARGUMENT", "unauthorized"),
        ("unexpected shape for input 'query'", "StatusCode.INVALID_ARGUMENT", "invalid_input"),  # Triton's own
        ("[request id: <id_unknown>] Exceeds maximum queue size", "StatusCode.UNAVAILABLE", "over_capacity"),
        ("the model's long lane is full (exceeds maximum queue size); retry", "StatusCode.UNAVAILABLE", "over_capacity"),
        (CLOSED_MESSAGE, "StatusCode.UNAVAILABLE", "shutting_down"),
        ("the model is being unloaded; retry", "StatusCode.UNAVAILABLE", "unavailable"),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", "unavailable"),
        ("Stub process 'nv-embed-v2_0_0' is not healthy.", "StatusCode.INTERNAL", "unavailable"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", "internal"),
        # a tritonserver stopping (seen when a replica's serve.sh is killed mid-run, test_corpus)
        ("Request for unknown model: 'nv-embed-v2' has no available versions", "StatusCode.NOT_FOUND", "shutting_down"),
        ("Request for unknown model: 'nv-embed-v3' is not found", "StatusCode.NOT_FOUND", "internal"),  # a wrong name
        ("CANCELLED", "StatusCode.CANCELLED", "shutting_down"),  # tritonserver cancels what it holds as it stops
        (TIMEOUT_MESSAGE, "StatusCode.CANCELLED", "cancelled"),  # the model's own
        (CANCELLED_MESSAGE, "CANCELLED", "cancelled"),
        ("encoding failed: out of memory", "StatusCode.INTERNAL", "internal"),
        ("something else", None, "internal"),
    ],
)
def test_what_clients_receive_maps_to_its_reason(message, status, expected):
    assert reason_of(message, status).name == expected


# name: (the model's Triton code, the Python client retries, the OpenAI API's HTTP status)
CONSEQUENCES = {
    "invalid_input": ("INVALID_ARG", False, 400),
    "unauthorized": ("INVALID_ARG", False, 500),  # Triton refused the OpenAI API's own key: the deployment's fault
    "over_capacity": ("UNAVAILABLE", True, 429),
    "shutting_down": ("UNAVAILABLE", True, 503),
    "unavailable": ("UNAVAILABLE", True, 503),
    "cancelled": ("CANCELLED", False, 499),
    "internal": ("INTERNAL", False, 500),
}


def test_each_reason_has_the_consequences_users_rely_on():
    assert set(REASONS) == set(CONSEQUENCES)
    for name, (code, retry, http_status) in CONSEQUENCES.items():
        assert (REASONS[name].triton_code, REASONS[name].retry) == (code, retry)
        assert as_api_error(EmbeddingError(f"why: {name}", code, name)).status == http_status
