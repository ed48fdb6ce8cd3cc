"""Calls each registered function at its time, on one thread: the model answers a request whose own
timeout passed at that moment, whatever the lane that holds it is computing. (Triton 2.51 ends a
request at its timeout only while it waits in Triton's queue.)"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import traceback
from collections.abc import Callable


class Deadlines:
    def __init__(self, setup: Callable[[], object] = lambda: None):
        """`setup` runs first on the thread."""
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()  # ties in time go first come, first served
        self._changed = threading.Condition()
        self._closed = False
        self._setup = setup
        self._thread = threading.Thread(target=self._loop, name="deadlines", daemon=True)
        self._thread.start()

    def at(self, when: float, call: Callable[[], object]) -> None:
        """Calls `call` at time.monotonic() `when`. There is no unregistering: a call that finds nothing
        left to do returns at once, and what it holds should be small by then."""
        with self._changed:
            heapq.heappush(self._heap, (when, next(self._order), call))
            if self._heap[0][2] is call:  # the earliest now: the thread must wake sooner
                self._changed.notify()

    def pending(self) -> int:
        with self._changed:
            return len(self._heap)

    def _loop(self) -> None:
        self._setup()
        while True:
            with self._changed:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, call = heapq.heappop(self._heap)
            try:
                call()  # outside the lock: a call may register another
            except Exception:  # one failed call must not end the others' thread; its trace goes to the log
                traceback.print_exc()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(5.0)
