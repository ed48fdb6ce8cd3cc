"""A request the model has taken on, until its one final response is sent.

The model answers each request later, from a lane's thread or the deadline thread, through its
response sender. Triton 2.51 frees a request's response factory when its final response is sent,
and asking the request whether its client left after that (request.is_cancelled()) crashed
tritonserver (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). So the ask and the send go
through one lock, nothing is asked once the request is claimed for its answer, and only one caller
can claim it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Held:
    is_cancelled: Callable[[], bool]  # the request's own: whether its client left
    send_final: Callable[[Any], None]  # sends the final response
    taken: float  # time.monotonic() when taken on
    deadline: float | None = None  # time.monotonic() when its own timeout passes; None: none
    wanted: frozenset[str] = frozenset()  # the outputs it asked for
    job: Any = None  # what to compute (request_rules.Job), once read
    request: Any = None  # kept until answered: its inputs live as long as it does
    placed: bool = False  # holds one of the model's max_held_requests places
    checked: float = field(init=False)  # when the client was last asked after (or taken on)
    answered: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.checked = self.taken

    def client_left(self, now: float) -> bool:
        """Asks the request whether its client left; an answered request is never asked (and counts as gone)."""
        with self._lock:
            if self.answered:
                return True
            self.checked = now
            return self.is_cancelled()

    def timed_out(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def claim(self) -> bool:
        """True for the first caller only, who must then send the final response (send_final). From
        then on the client is never asked after, and the request is let go (its job stays: a lane
        computing it may still read it)."""
        with self._lock:
            if self.answered:
                return False
            self.answered = True
            self.request = None
        return True
