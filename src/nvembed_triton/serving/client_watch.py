"""Watching a public instance's client while the instance waits on the encoder.

A request is forwarded on the instance's own thread: the BLS call blocks it until the encoder
answers, and nothing hands the request from thread to thread on its way (each hand-off cost a lone
query ~0.1 ms: bench/RESULTS.md). Meanwhile one watcher thread per instance asks whether the client
is still there: at once (it may have gone while the request was queued), then after `first_s`,
each wait twice the one before, at most `max_s`. A client found gone has its request marked
(`mark`, the cancel board), so the encoder skips what is left of its work and answers it early.
Each ask is an IPC call through tritonserver: asking at a short fixed interval took a large share
of the instances' CPU at 64 clients (bench/RESULTS.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ClientWatch:
    def __init__(self, mark: Callable[[str], None], clear: Callable[[str], None], first_s: float, max_s: float):
        self._mark, self._clear, self._first_s, self._max_s = mark, clear, first_s, max_s
        self._changed = threading.Condition()
        self._watched: tuple[int, Callable[[], bool], str] | None = None  # (serial, is_gone, token)
        self._serial = 0
        self._gone: set[int] = set()  # serials of watched requests whose client was found gone
        self._closed = False
        threading.Thread(target=self._loop, name="client-watch", daemon=True).start()

    @contextmanager
    def watching(self, is_gone: Callable[[], bool], token: str) -> Iterator[Callable[[], bool]]:
        """Watches the client with is_gone() while the block runs, and never after it; yields a
        function saying whether it was found gone. A mark left when the block ends is cleared."""
        with self._changed:
            self._serial += 1
            serial = self._serial
            self._watched = (serial, is_gone, token)
            self._changed.notify()
        try:
            yield lambda: serial in self._gone
        finally:
            with self._changed:  # waits out an ask in progress: the request's execute() may end after this
                self._watched = None
                found_gone = serial in self._gone
                self._gone.discard(serial)
            if found_gone:
                self._clear(token)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _still(self, serial: int) -> bool:
        return not self._closed and self._watched is not None and self._watched[0] == serial

    def _loop(self) -> None:
        with self._changed:
            while not self._closed:
                if self._watched is None:
                    self._changed.wait()
                    continue
                serial, is_gone, token = self._watched
                wait_s = 0.0
                while self._still(serial):
                    if wait_s and (self._changed.wait(wait_s) or not self._still(serial)):
                        break  # woken: another request's watch begins (or the watcher closes)
                    if is_gone():  # under the lock, so the block cannot end meanwhile
                        self._gone.add(serial)
                        self._mark(token)
                        self._changed.wait_for(lambda serial=serial: not self._still(serial))
                        break
                    wait_s = min(max(2 * wait_s, self._first_s), self._max_s)
