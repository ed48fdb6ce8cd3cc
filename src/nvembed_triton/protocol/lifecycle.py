"""What the launcher and the model share about the server's life: the flag that closes the door
during a drain, and the messages of requests ended before they were embedded. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path

# The launcher creates this file when a drain stops taking new requests; the model reads its path
# from the environment tritonserver passes to it.
CLOSED_FLAG_ENV = "NVEMBED_CLOSED_FLAG"
CANCELLED_MESSAGE = "the client cancelled the request"
TIMEOUT_MESSAGE = "the request's timeout passed before its embeddings were ready"
CLOSED_MESSAGE = "the server is shutting down and takes no new requests; retry (another replica serves it)"


# The supervisor's view of the server, in a file the OpenAI front reads for its readiness: "ready",
# or "not ready: why" (restarting, a liveness check unanswered, no progress while work waits).
# Triton's own readiness cannot say a stuck model is not ready; this can, until the restart.
HEALTH_FILE_ENV = "NVEMBED_HEALTH_FILE"


def supervisor_says_ready() -> bool:
    """True unless the supervisor (if there is one) says otherwise."""
    path = os.environ.get(HEALTH_FILE_ENV)
    if not path:
        return True
    try:
        return Path(path).read_text().startswith("ready")
    except OSError:
        return False


def is_closed() -> bool:
    flag = os.environ.get(CLOSED_FLAG_ENV)
    return bool(flag) and Path(flag).exists()
