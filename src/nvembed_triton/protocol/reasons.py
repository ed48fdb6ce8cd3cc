"""Why a request was not answered: one table, read by the model (the Triton error code it answers
with, and the metrics' label) and the clients (whether to send the request again; the OpenAI API
maps each to an HTTP status). reason_of reads the reason back from an error a client received: its
gRPC status, and for the statuses several reasons share, the message (Triton's own texts and the
model's). Standard library only: the light client imports it."""

from __future__ import annotations

from dataclasses import dataclass

from nvembed_triton.protocol.contract import INFERENCE_KEY_HEADER
from nvembed_triton.protocol.lifecycle import CANCELLED_MESSAGE, CLOSED_MESSAGE, TIMEOUT_MESSAGE


@dataclass(frozen=True)
class Reason:
    name: str  # the metrics' `reason` label
    triton_code: str  # the pb_utils.TritonError code the model answers with; clients see it as the gRPC status
    retry: bool  # whether sending the same request again can succeed


REASONS = {
    reason.name: reason
    for reason in (
        Reason("invalid_input", "INVALID_ARG", False),  # the client must change the request
        Reason("unauthorized", "INVALID_ARG", False),  # the inference key is missing or wrong
        Reason("over_capacity", "UNAVAILABLE", True),  # the queue or a lane is full: retry with backoff
        Reason("shutting_down", "UNAVAILABLE", True),  # the server drains: another replica serves it
        Reason("unavailable", "UNAVAILABLE", True),  # restarting or not reachable: retry shortly
        Reason("cancelled", "CANCELLED", False),  # the client went away or its timeout passed
        Reason("internal", "INTERNAL", False),  # a fault of the server
    )
}
# "Exceeds maximum queue size" is Triton's words for a full queue; the model says it too when full.
FULL_QUEUE = "maximum queue size"
UNAUTHORIZED_MESSAGE = f"the inference key (header {INFERENCE_KEY_HEADER}) is missing or wrong"


def reason_of(message: str, grpc_status: str | None = None) -> Reason:
    """The reason of an error a client received, from its gRPC status (`StatusCode.X` or `X`)."""
    status = (grpc_status or "").removeprefix("StatusCode.")
    if status == "INVALID_ARGUMENT":
        return REASONS["unauthorized" if UNAUTHORIZED_MESSAGE in message else "invalid_input"]
    if status == "UNAVAILABLE":  # a full queue, a drain, a restart, or a connection refused or dropped
        if FULL_QUEUE in message:
            return REASONS["over_capacity"]
        return REASONS["shutting_down" if CLOSED_MESSAGE in message else "unavailable"]
    if status == "CANCELLED":
        # Without the model's own message, tritonserver cancelled what it held as it stopped: the
        # client did not go away, and another replica (or this one, restarted) serves the request.
        return REASONS["cancelled" if CANCELLED_MESSAGE in message or TIMEOUT_MESSAGE in message else "shutting_down"]
    if "not healthy" in message:  # INTERNAL: a stub died; serve.sh is restarting the server
        return REASONS["unavailable"]
    # A stopping tritonserver unloads its model while connections are still open (NOT_FOUND); a
    # misspelt model name is "unknown model: 'x' is not found" instead, and is not retried.
    if "has no available versions" in message:
        return REASONS["shutting_down"]
    return REASONS["internal"]
