"""Watching the clients of the requests a public instance has forwarded to the encoder.

A public instance holds many requests at once, each waiting on the encoder on its own thread. One
watcher thread per instance asks after each request's client: at once (it may have gone while the
request was queued), then after `first_s`, each wait twice the one before, at most `max_s`. A client
found gone has its request marked (`mark`, the cancel board), so the encoder skips what is left of
its work and answers it early. Each ask is an IPC call through tritonserver: asking at a short fixed
interval took a large share of the instances' CPU at 64 clients (bench/RESULTS.md).

A request is never asked after its watch ends: its response is sent then, and Triton 2.51 frees
what the ask reads with the final response (asking after it crashed tritonserver: SIGSEGV in
TRITONBACKEND_ResponseFactoryIsCancelled). Ending a watch waits out an ask of that request in
progress; asks of other requests go on meanwhile."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class _Watched:
    is_gone: Callable[[], bool]
    token: str
    due: float  # when to ask next (time.monotonic())
    wait_s: float = 0.0  # the wait before this ask
    gone: bool = False


class ClientWatch:
    def __init__(self, mark: Callable[[str], None], clear: Callable[[str], None], first_s: float, max_s: float):
        self._mark, self._clear, self._first_s, self._max_s = mark, clear, first_s, max_s
        self._changed = threading.Condition()
        self._watched: dict[int, _Watched] = {}  # serial -> a request being watched
        self._serials = itertools.count()
        self._asking: int | None = None  # the serial whose client is being asked, outside the lock
        self._closed = False
        threading.Thread(target=self._loop, name="client-watch", daemon=True).start()

    @contextmanager
    def watching(self, is_gone: Callable[[], bool], token: str) -> Iterator[Callable[[], bool]]:
        """Watches the client with is_gone() while the block runs, and never after it; yields a
        function saying whether it was found gone. A mark left when the block ends is cleared."""
        watched = _Watched(is_gone, token, due=time.monotonic())
        with self._changed:
            serial = next(self._serials)
            self._watched[serial] = watched
            self._changed.notify_all()
        try:
            yield lambda: watched.gone
        finally:
            with self._changed:  # an ask of this request in progress ends first: its response follows the block
                self._changed.wait_for(lambda: self._asking != serial)
                del self._watched[serial]
            if watched.gone:
                self._clear(token)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _loop(self) -> None:
        with self._changed:
            while not self._closed:
                waiting = [(w.due, serial) for serial, w in self._watched.items() if not w.gone]
                if not waiting:
                    self._changed.wait()
                    continue
                due, serial = min(waiting)
                if due > time.monotonic():
                    self._changed.wait(due - time.monotonic())  # woken early by a new watch or a close
                    continue
                self._ask(serial, self._watched[serial])

    def _ask(self, serial: int, watched: _Watched) -> None:
        """Called and returns holding the lock; the IPC call is made without it, so other watches
        begin and end meanwhile (this one's end waits for it)."""
        self._asking = serial
        self._changed.release()
        try:
            gone = watched.is_gone()
        except Exception:  # an ask that failed says nothing: ask again later
            gone = False
        finally:
            self._changed.acquire()
            self._asking = None
            self._changed.notify_all()
        if gone:
            watched.gone = True
            self._mark(watched.token)
        else:
            watched.wait_s = min(max(2 * watched.wait_s, self._first_s), self._max_s)
            watched.due = time.monotonic() + watched.wait_s
