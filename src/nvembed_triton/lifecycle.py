"""What the launcher and the models share about the server's life: the flag that closes the door
during a drain, the cancel board, and the reasons error messages start with. Standard library only: the front
instances import it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

# The launcher creates this file when a drain stops taking new requests; the models read its path
# from the environment tritonserver passes to them.
CLOSED_FLAG_ENV = "NVEMBED_CLOSED_FLAG"
# The launcher's folder for CancelBoard, and the BLS request parameter that carries a token.
CANCEL_DIR_ENV = "NVEMBED_CANCEL_DIR"
CANCEL_TOKEN_PARAMETER = "cancel_token"
CANCELLED_MESSAGE = "the client cancelled the request"
CLOSED_MESSAGE = "the server is shutting down and takes no new requests; retry (another replica serves it)"


def is_closed() -> bool:
    flag = os.environ.get(CLOSED_FLAG_ENV)
    return bool(flag) and Path(flag).exists()


class CancelBoard:
    """Marks forwarded requests whose client has gone, so the encoder skips their work. Triton
    2.51's Python backend cannot cancel a BLS request, so the public model, which sees its client
    cancel (or its timeout pass), leaves a mark named by a random token that travels with the
    forwarded request as a parameter; the encoder looks before each forward pass. The board is a
    folder the launcher creates; without one (another launcher) nothing is marked."""

    def __init__(self, folder: str | None = None):
        folder = folder if folder is not None else os.environ.get(CANCEL_DIR_ENV, "")
        self.folder = Path(folder) if folder else None

    def new_token(self) -> str | None:
        return uuid.uuid4().hex if self.folder else None

    def _path(self, token: str | None) -> Path | None:
        # Tokens come from requests, which a client can also send to the encoder directly: only
        # 32 hex digits ever name a file, so no path can be smuggled in.
        if self.folder is None or not token or len(token) != 32 or not all(c in "0123456789abcdef" for c in token):
            return None
        return self.folder / token

    def mark(self, token: str | None) -> None:
        if path := self._path(token):
            path.touch()

    def is_marked(self, token: str | None) -> bool:
        path = self._path(token)
        return path is not None and path.exists()

    def clear(self, token: str | None) -> None:
        if path := self._path(token):
            path.unlink(missing_ok=True)


# Triton 2.51 turns every error a BLS request returns into INTERNAL. So the encoder starts each
# error message with its reason, and the public model restores the code from it.
REASON_CODES = {
    "invalid_input": "INVALID_ARG",
    "cancelled": "CANCELLED",
    "over_capacity": "UNAVAILABLE",
    "shutting_down": "UNAVAILABLE",
    "unavailable": "UNAVAILABLE",
    "internal": "INTERNAL",
}


def reason_of(message: str) -> str:
    """The reason an error message starts with ("invalid_input: ..."), or what Triton's own
    messages mean; "internal" for anything else."""
    head = message.split(":", 1)[0]
    if head in REASON_CODES:
        return head
    if "maximum queue size" in message:
        return "over_capacity"
    if "not healthy" in message:  # a stub died; serve.sh is restarting the server
        return "unavailable"
    return "internal"
