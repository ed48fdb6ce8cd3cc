"""Why a request was not answered: one table, read by the models (the Triton error code they
return), the clients (whether to send the request again) and the OpenAI API (its HTTP status and
error type). Triton's own message texts are matched in one place, reason_of. Standard library only:
the front instances and the light client import it.

Triton 2.51 turns every error a BLS request returns into INTERNAL, so the models start each error
message with its reason ("invalid_input: ..."), and the public model restores the code from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    name: str  # the message prefix and the metrics' `reason` label
    triton_code: str  # the pb_utils.TritonError code a model answers with; clients see it as the gRPC status
    http_status: int  # what the OpenAI API answers
    openai_type: str  # the OpenAI error's `type`
    retry: bool  # whether sending the same request again can succeed
    meaning: str


REASONS = {
    reason.name: reason
    for reason in (
        Reason("invalid_input", "INVALID_ARG", 400, "invalid_request_error", False, "the client must change the request"),
        Reason("over_capacity", "UNAVAILABLE", 429, "server_error", True, "a queue or lane is full: retry with backoff"),
        Reason("shutting_down", "UNAVAILABLE", 503, "server_error", True, "the server drains: another replica serves it"),
        Reason("unavailable", "UNAVAILABLE", 503, "server_error", True, "restarting or not reachable: retry shortly"),
        Reason("cancelled", "CANCELLED", 499, "invalid_request_error", False, "the client went away or its timeout passed"),
        Reason("internal", "INTERNAL", 500, "server_error", False, "a fault of the server"),
    )
}


def reason_of(message: str, grpc_status: str | None = None) -> Reason:
    """The reason of an error, from the prefix our models put on its message, else from what
    Triton's and gRPC's own errors say: a full queue, a dead stub (serve.sh restarts the server), a
    connection refused or dropped (UNAVAILABLE), a bad request Triton itself refused."""
    head = message.split(":", 1)[0]
    if head in REASONS:
        return REASONS[head]
    if "maximum queue size" in message:
        return REASONS["over_capacity"]
    if "not healthy" in message:  # a stub died; serve.sh is restarting the server
        return REASONS["unavailable"]
    # A stopping tritonserver unloads its models while connections are still open (NOT_FOUND);
    # another replica, or this one once restarted, serves the request. A misspelt model name is
    # "unknown model: 'x' is not found" instead, and is not retried.
    # So does a forwarded (BLS) request made while it stops: "Server not ready", INTERNAL after BLS.
    if "has no available versions" in message or "Server not ready" in message:
        return REASONS["shutting_down"]
    status = (grpc_status or "").removeprefix("StatusCode.")
    # A bare CANCELLED (no "cancelled:" of ours) comes from tritonserver itself, which cancels the
    # requests it holds when it stops: the client did not go away, and another replica can serve it.
    by_status = {"UNAVAILABLE": "unavailable", "INVALID_ARGUMENT": "invalid_input", "CANCELLED": "shutting_down"}
    return REASONS[by_status.get(status, "internal")]
