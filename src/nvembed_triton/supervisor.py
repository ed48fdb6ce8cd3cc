"""Keeps a tritonserver serving, and stops it without losing accepted work.

Triton 2.51's Python backend never restarts a stub process that died: every request it would have
served fails with INTERNAL "Stub process ... is not healthy" while server and model readiness stay
true. So the launcher watches the stubs (every STUB_CHECK_INTERVAL_S) and sends a real inference
through the public model (every PROBE_INTERVAL_S); on a failure it restarts tritonserver. While it
restarts, the ports are closed: probes see not-ready and clients get UNAVAILABLE, which they retry.

A stop drains: requests already queued are served, new ones are refused with UNAVAILABLE once the
queue has emptied, and the processes end when nothing is executing."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .metrics import EXECUTING_METRIC
from .server import ServerError, TritonServer

STUB_CHECK_INTERVAL_S = 0.5
PROBE_INTERVAL_S = 5.0
# A restart that fails this many times in a row ends the launcher (exit 1): the fault is not transient.
MAX_FAILED_RESTARTS = 3
PENDING_METRIC = "nv_inference_pending_request_count"  # Triton's: requests queued, per model
DRAIN_SETTLE_S = 0.5


def scrape(url: str, names: set[str]) -> dict[tuple[str, str], float]:
    """(metric name, model) -> value for the Prometheus series named in `names`."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in names and 'model="' in rest:
            model = rest.split('model="', 1)[1].split('"', 1)[0]
            values[(name, model)] = values.get((name, model), 0.0) + float(line.rsplit(" ", 1)[1])
    return values


class Supervisor:
    """Runs in the launcher's main thread; `stop` (set from a signal handler) ends `run`."""

    def __init__(self, server: TritonServer, probe: Callable[[], None], closed_flag: Path, log: Callable[[str], None]):
        self.server, self.probe, self.closed_flag, self.log = server, probe, closed_flag, log
        self.stop = threading.Event()
        self.restarts = 0
        # The probe runs on its own thread: it queues behind real work (up to serve.PROBE_TIMEOUT_S),
        # and a stop must start the drain at once, not when the probe returns.
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="health-probe")

    def run(self) -> int:
        """Watches until `stop` is set; returns the exit code. The server must be ready."""
        instances = self._instances()
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        failed_restarts = 0
        while not self.stop.wait(STUB_CHECK_INTERVAL_S):
            problem = self._problem(instances, probe_due=time.monotonic() >= next_probe)
            if problem is None:
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + PROBE_INTERVAL_S
                failed_restarts = 0
                continue
            self.log(f"{problem}; restarting tritonserver")
            try:
                self.restart()
            except ServerError as error:
                failed_restarts += 1
                self.log(f"restart {failed_restarts} failed: {error}")
                if failed_restarts >= MAX_FAILED_RESTARTS:
                    return 1
                continue
            instances = self._instances()
            next_probe = time.monotonic() + PROBE_INTERVAL_S
        return 0

    def _instances(self) -> set[str]:
        return {stub.instance for stub in self.server.stubs()}

    def _problem(self, instances: set[str], probe_due: bool) -> str | None:
        if not self.server.is_running():
            return f"tritonserver exited with code {self.server.returncode}"
        dead = instances - self._instances()
        if dead:
            return "the stub process of " + ", ".join(sorted(dead)) + " died"
        if probe_due:
            probing = self._prober.submit(self.probe)
            while not probing.done():
                if self.stop.wait(0.05):
                    return None  # stopping: the drain serves the probe like any accepted request
            if (error := probing.exception()) is not None:  # any failure of a real inference is a failure
                return f"health probe failed: {error}"
        return None

    def restart(self) -> None:
        started = time.monotonic()
        self.server.kill()
        self.closed_flag.unlink(missing_ok=True)
        self.server.start()
        self.server.wait_ready()
        self.restarts += 1
        self.log(f"tritonserver restarted and ready in {time.monotonic() - started:.1f} s")

    def drain(self, timeout_s: float) -> None:
        """Serves what was queued, then closes the door (new requests: UNAVAILABLE), waits until
        nothing executes, and ends the processes; `timeout_s` bounds the whole of it."""
        deadline = time.monotonic() + timeout_s
        if self.server.is_running():
            queued = self._wait_until(lambda load: load[PENDING_METRIC] == 0, deadline)
            self.closed_flag.touch()
            # Idle must hold for DRAIN_SETTLE_S: a response is still being sent for a moment after
            # its execute() returns, and a request is neither queued nor executing while Triton
            # hands it to an instance.
            idle = queued and self._wait_until(lambda load: sum(load.values()) == 0, deadline, settle_s=DRAIN_SETTLE_S)
            self.log("drained" if idle else f"drain timed out after {timeout_s:.0f} s; stopping anyway")
        self.server.kill()

    def _wait_until(self, done: Callable[[dict[str, float]], bool], deadline: float, settle_s: float = 0.0) -> bool:
        """True once `done` holds for the server's load and has held for settle_s; False at the deadline."""
        names = {PENDING_METRIC, EXECUTING_METRIC}
        held_since = None
        while time.monotonic() < deadline:
            try:
                values = scrape(self.server.settings.metrics_url, names)
            except OSError:
                return False  # the server is gone: nothing left to wait for
            load = {name: sum(v for (n, _), v in values.items() if n == name) for name in names}
            if not done(load):
                held_since = None
            elif held_since is None:
                held_since = time.monotonic()
            if held_since is not None and time.monotonic() - held_since >= settle_s:
                return True
            time.sleep(0.05)
        return False
