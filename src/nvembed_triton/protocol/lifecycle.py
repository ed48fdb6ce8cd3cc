"""What the launcher and the models share about the server's life: the flag that closes the door
during a drain, and the cancel board. Standard library only: the front
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
