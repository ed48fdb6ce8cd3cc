"""The errors a caller sees, shared by the server side and the clients. Standard library only."""

from __future__ import annotations


class EmbeddingError(Exception):
    """The texts were not embedded. `status` is the gRPC status name (e.g. "INTERNAL") when a
    server said so, else None; `reason` the reasons.REASONS name of why, where known."""

    def __init__(self, message: str, status: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.reason = status, reason


class InvalidInputError(EmbeddingError, ValueError):
    """A request the client must fix; sending it again would fail again. Raised by the model
    (returned as INVALID_ARGUMENT, and the server carries on) and by the clients, before sending
    or from the server's answer."""


class ServerUnavailableError(EmbeddingError, ConnectionError):
    """The server could not be reached, even after retries."""


class UnauthorizedError(EmbeddingError, PermissionError):
    """The server requires an inference key, and the request's was missing or wrong. Not retried."""
