"""The model's own scheduling: short requests never wait behind long ones.

Triton's Python backend runs one execute() at a time per model instance, so a request that takes a
minute (a 32k-token document on a CPU) would hold every request that arrives after it. So the
model's execute() only hands its requests to Lanes and returns; each request's response goes out
through its response sender when it is ready. There are two lanes, each a thread: requests with at
most `long_request_bytes` of text run on the short lane, larger ones on the long lane, so a query
waits at most for the short work ahead of it, whatever the long lane is computing. A lane that
becomes free takes what is waiting (up to `batch_bytes` of text, at least one request) and
computes it together, so concurrent requests still share token-budget-packed passes.

Each lane also bounds what it holds (requests and bytes of text): beyond that a request is
refused, and the caller answers it as over capacity. The long lane holds fewer requests than the
model may hold, so long requests never take every place and short ones always find one."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class LaneLimits:
    max_requests: int  # requests waiting in one lane
    max_bytes: int  # bytes of text waiting in one lane
    batch_bytes: int  # bytes of text one lane takes at once (at least one request)


class Lane(Generic[Item]):
    """A thread computing batches of waiting items, first come first served."""

    def __init__(
        self, name: str, run_batch: Callable[[list[Item], Lane[Item]], None], limits: LaneLimits,
        setup: Callable[[], object] = lambda: None,
    ):  # fmt: skip
        self.name, self._run_batch, self._limits, self._setup = name, run_batch, limits, setup
        self._waiting: deque[tuple[Item, int]] = deque()
        self._waiting_bytes = 0
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-lane", daemon=True)
        self._thread.start()

    def submit(self, item: Item, size: int) -> bool:
        """Queues `item` (`size` bytes of text); False if the lane is full or closed."""
        with self._changed:
            full = len(self._waiting) >= self._limits.max_requests or self._waiting_bytes + size > self._limits.max_bytes
            if self._closed or (full and self._waiting):  # an empty lane takes any one request
                return False
            self._waiting.append((item, size))
            self._waiting_bytes += size
            self._changed.notify()
        return True

    def waiting(self) -> int:
        """Requests waiting now (not those being computed)."""
        with self._changed:
            return len(self._waiting)

    def _take(self) -> list[Item] | None:
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if not self._waiting:
                return None  # closed and empty
            batch, taken = [], 0
            while self._waiting and (not batch or taken + self._waiting[0][1] <= self._limits.batch_bytes):
                item, size = self._waiting.popleft()
                batch.append(item)
                taken += size
            self._waiting_bytes -= taken
            return batch

    def _loop(self) -> None:
        self._setup()
        while (batch := self._take()) is not None:
            self._run_batch(batch, self)  # must answer every item itself, errors included

    def close(self, timeout_s: float) -> list[Item]:
        """Stops taking work; the batch being computed finishes (up to timeout_s). Returns the
        items never started, for the caller to refuse."""
        with self._changed:
            self._closed = True
            left = [item for item, _ in self._waiting]
            self._waiting.clear()
            self._waiting_bytes = 0
            self._changed.notify_all()
        self._thread.join(timeout_s)
        return left


class Lanes(Generic[Item]):
    """The short and the long lane, and which one a request goes to."""

    def __init__(
        self, run_batch: Callable[[list[Item], Lane[Item]], None], long_request_bytes: int, limits: LaneLimits,
        setup: Callable[[], object] = lambda: None, long_limits: LaneLimits | None = None,
    ):  # fmt: skip
        """`setup` runs first on each lane's thread; the long lane has `long_limits` if given, else `limits`."""
        self.long_request_bytes = long_request_bytes
        self.short = Lane("short", run_batch, limits, setup)
        self.long = Lane("long", run_batch, long_limits or limits, setup)

    def lane_for(self, size: int) -> Lane[Item]:
        return self.long if size > self.long_request_bytes else self.short

    def submit(self, item: Item, size: int) -> bool:
        return self.lane_for(size).submit(item, size)

    def close(self, timeout_s: float) -> list[Item]:
        return self.short.close(timeout_s) + self.long.close(timeout_s)
