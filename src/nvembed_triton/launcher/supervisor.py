"""Keeps a tritonserver serving, and stops it without losing accepted work.

Triton 2.51's Python backend never restarts a stub process that died: every request it would have
served fails with INTERNAL "Stub process ... is not healthy" while server and model readiness stay
true. So the launcher watches, and restarts tritonserver only on evidence that it is broken, never
because it is busy:
- a process died: tritonserver, or any stub (checked every `stub_check_s`);
- tritonserver stopped answering its gRPC liveness call (`health_failures` checks in a row, one every
  `health_interval_s`);
- a real query (one every `health_interval_s`) came back
  wrong: an error other than "busy", or a vector that is not of unit length;
- work is waiting but nothing progresses for `stall_timeout_s`: no request completed, no forward
  pass ended, and the model's processes used (almost) no CPU. A slow request, however long, is
  progress: its passes end or its process computes.
A probe that is still waiting is not a failure: the stall rule decides whether the server is stuck.
The health file says "not ready" from the first sign (a liveness check unanswered, no progress
for a third of stall_timeout_s) until the server serves again, for the OpenAI front's readiness.
Every check that talks to the server runs on a thread of its own, so the stub check, and a stop,
never wait behind one. While tritonserver restarts, its ports are closed: probes see not-ready and
clients get UNAVAILABLE, which they retry.

A stop drains: requests already held are served, new ones are refused with UNAVAILABLE, and the
processes end when nothing is executing."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nvembed_triton.launcher.server import ServerError, TritonServer
from nvembed_triton.model.metrics import EXECUTING_METRIC

# A restart that fails this many times in a row ends the launcher (exit 1): the fault is not transient.
MAX_FAILED_RESTARTS = 3
MAX_STARTS = 3  # starts of one tritonserver that crash while loading (see Supervisor.start)
PENDING_METRIC = "nv_inference_pending_request_count"  # Triton's: requests queued, per model
# Completions: any change in these (summed over the served models) is progress.
PROGRESS_METRICS = ("nv_inference_request_success", "nv_inference_request_failure", "nvembed_forward_passes_total")
# While work waits, the model's processes using at least this share of one core are computing,
# not stuck: a stopped or deadlocked process uses none.
STALL_MIN_CPU_SHARE = 0.05
DRAIN_SETTLE_S = 0.5
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Timings:
    """How often the supervisor looks and how long it waits (settings health_interval_s and
    stall_timeout_s; tests make them short)."""

    stub_check_s: float = 0.5
    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    health_failures: int = 3
    stall_timeout_s: float = 45.0
    load_check_s: float = 2.0  # how often the stall rule reads the metrics (each read parses Triton's whole page)


def scrape(url: str, names: set[str]) -> dict[tuple[str, str], float]:
    """(metric name, model) -> value, summed over other labels, for the Prometheus series named in `names`."""
    from prometheus_client.parser import text_string_to_metric_families  # the serving extra's, not the client's

    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and "model" in sample.labels:
                key = (sample.name, sample.labels["model"])
                values[key] = values.get(key, 0.0) + sample.value
    return values


class Background:
    """One call at a time on a thread of its own; the caller looks at the outcome when it is ready
    and is never held up by it."""

    def __init__(self, pool: ThreadPoolExecutor, call: Callable[[], object]):
        self._pool, self._call = pool, call
        self._future: Future | None = None

    def start(self) -> None:
        if self._future is None:
            self._future = self._pool.submit(self._call)

    def outcome(self) -> Future | None:
        """The finished call (then forgotten, so the next start() makes a new one), else None."""
        if self._future is None or not self._future.done():
            return None
        finished, self._future = self._future, None
        return finished


class Watch:
    """What the supervisor knows about one tritonserver process: its stubs, its checks in flight,
    and when it last made progress."""

    def __init__(self, supervisor: Supervisor):
        server = supervisor.server
        self.instances = {stub.instance for stub in server.stubs()}  # every stub seen alive, by name
        self.expected = server.expected_stubs()
        pool = supervisor.pool
        self.liveness = Background(pool, lambda: server.is_live(supervisor.timings.health_timeout_s))
        self.probe = Background(pool, supervisor.probe)
        self.load = Background(pool, lambda: scrape(server.settings.metrics_url, {PENDING_METRIC, EXECUTING_METRIC,
                                                                                  *PROGRESS_METRICS}))  # fmt: skip
        self.next_health = time.monotonic() + supervisor.timings.health_interval_s
        self.next_load = time.monotonic()
        self.failed_liveness = 0
        self.progress_marker: tuple[float, float, float] | None = None  # (when, completions, stubs' CPU s)
        self.doubt: str | None = None  # why the server may be stuck, before it counts as broken


class Supervisor:
    """Runs in the launcher's main thread; `stop` (set from a signal handler) ends `run`.
    `probe` raises ProbeFailed for a wrong answer, and anything else for a call that did not end
    well; `is_busy(error)` says which of those mean only that the server is busy."""

    def __init__(
        self, server: TritonServer, probe: Callable[[], None], closed_flag: Path, log: Callable[[str], None],
        timings: Timings = Timings(), is_busy: Callable[[BaseException], bool] = lambda error: False,
        health_file: Path | None = None,
    ):  # fmt: skip
        self.server, self.probe, self.closed_flag, self.log = server, probe, closed_flag, log
        self.timings, self.is_busy, self.health_file = timings, is_busy, health_file
        self.stop = threading.Event()
        self.restarts = 0
        self._said: str | None = None
        self.pool = ThreadPoolExecutor(3, thread_name_prefix="supervisor-check")

    def watch(self) -> Watch:
        """What to watch of the server as it is now: take it as soon as the server is ready, so that a
        process that dies before run() starts is not missed."""
        return Watch(self)

    def run(self, watch: Watch | None = None) -> int:
        """Watches until `stop` is set; returns the exit code. The server must be ready."""
        watch = watch or self.watch()
        failed_restarts = 0
        while not self.stop.wait(self.timings.stub_check_s):
            problem = self.problem(watch)
            self.say_health(watch.doubt or "ready")
            if problem is None:
                continue
            self.log(f"{problem}; restarting tritonserver")
            self.say_health(f"not ready: restarting ({problem})")
            try:
                self.restart()
            except ServerError as error:
                failed_restarts += 1
                self.log(f"restart {failed_restarts} failed: {error}")
                if failed_restarts >= MAX_FAILED_RESTARTS:
                    return 1
                continue
            failed_restarts = 0
            watch = self.watch()  # a new process: its own stubs and checks
        return 0

    def problem(self, watch: Watch) -> str | None:
        """What is broken, if anything; returns at once (the checks run in the background)."""
        if not self.server.is_running():
            return f"tritonserver exited with code {self.server.returncode}"
        alive = {stub.instance for stub in self.server.stubs()}
        dead, watch.instances = watch.instances - alive, watch.instances | alive
        if dead:
            return "the stub process of " + ", ".join(sorted(dead)) + " died"
        if len(alive) < watch.expected:  # one that died before it was first seen
            return f"{watch.expected - len(alive)} of {watch.expected} stub processes are gone"
        now = time.monotonic()
        if now >= watch.next_health:
            watch.next_health = now + self.timings.health_interval_s
            watch.liveness.start()
            watch.probe.start()  # not if the last one is still waiting: that is the stall rule's to judge
        if now >= watch.next_load:
            watch.next_load = now + self.timings.load_check_s
            watch.load.start()
        return self._liveness_problem(watch) or self._probe_problem(watch) or self._stall_problem(watch)

    def _liveness_problem(self, watch: Watch) -> str | None:
        if (finished := watch.liveness.outcome()) is None:
            return None
        live = finished.exception() is None and finished.result()
        watch.failed_liveness = 0 if live else watch.failed_liveness + 1
        watch.doubt = None if live else "not ready: tritonserver did not answer its liveness check"
        if watch.failed_liveness >= self.timings.health_failures:
            return f"tritonserver did not answer {watch.failed_liveness} liveness checks in a row"
        return None

    def _probe_problem(self, watch: Watch) -> str | None:
        if (finished := watch.probe.outcome()) is None or (error := finished.exception()) is None:
            return None
        return None if self.is_busy(error) else f"health probe failed: {error}"

    def _stall_problem(self, watch: Watch) -> str | None:
        finished = watch.load.outcome()
        if finished is None or finished.exception() is not None:  # the liveness check covers a silent server
            return None
        values = finished.result()
        waiting = sum(v for (name, _), v in values.items() if name in (PENDING_METRIC, EXECUTING_METRIC))
        completions = sum(v for (name, _), v in values.items() if name in PROGRESS_METRICS)
        now, cpu = time.monotonic(), self._stubs_cpu_s()
        marker = watch.progress_marker
        if marker is None or not waiting or completions != marker[1]:
            watch.progress_marker, watch.doubt = (now, completions, cpu), None
            return None
        since, _, cpu_then = marker
        if cpu - cpu_then >= STALL_MIN_CPU_SHARE * (now - since):  # computing one long pass: progress
            if now - since >= self.timings.stall_timeout_s:
                watch.progress_marker = (now, completions, cpu)
            watch.doubt = None
            return None
        if now - since >= self.timings.stall_timeout_s / 3:
            watch.doubt = f"not ready: no progress for {now - since:.0f} s with {waiting:.0f} request(s) waiting"
        if now - since < self.timings.stall_timeout_s:
            return None
        return f"no progress for {now - since:.0f} s with {waiting:.0f} request(s) waiting"

    def say_health(self, state: str) -> None:
        """The health file's state, written (atomically) when it changes."""
        if self.health_file is None or self._said == state:
            return
        partial = self.health_file.with_name(self.health_file.name + ".partial")
        partial.write_text(state + "\n")
        partial.replace(self.health_file)
        self._said = state

    def _stubs_cpu_s(self) -> float:
        """CPU seconds used so far by the model's stubs."""
        return sum(stub.cpu_s() for stub in self.server.stubs())

    def start(self) -> None:
        """Starts tritonserver and waits until it is ready (or `stop` is set). One that dies from a
        signal while starting is started again, up to MAX_STARTS times: Triton 2.51's Python backend
        sometimes aborts (boost::interprocess::lock_exception) while many instances initialise on a
        busy machine (seen in about 1 of 3 starts under a heavy load here, never twice in a row)."""
        for attempt in range(1, MAX_STARTS + 1):
            self.server.start()
            try:
                self.server.wait_ready(abort=self.stop)
                return
            except ServerError:
                crashed = (self.server.returncode or 0) < 0
                if not crashed or attempt == MAX_STARTS:
                    raise
                self.log(f"tritonserver died from signal {-self.server.returncode} while starting; starting it again")
                self.server.kill()

    def restart(self) -> None:
        started = time.monotonic()
        self.server.kill()
        self.closed_flag.unlink(missing_ok=True)
        self.start()
        if self.stop.is_set():  # stopping meanwhile: the drain follows, not a restart
            return
        self.restarts += 1
        self.log(f"tritonserver restarted and ready in {time.monotonic() - started:.1f} s")

    def drain(self, timeout_s: float) -> None:
        """Serves what was queued, then closes the door (new requests: UNAVAILABLE), waits until
        nothing executes, and ends the processes; `timeout_s` bounds the whole of it."""
        deadline = time.monotonic() + timeout_s
        self.say_health("not ready: draining (the server is stopping)")
        if self.server.is_running():
            queued = self._wait_until(lambda load: load[PENDING_METRIC] == 0, deadline)
            self.closed_flag.touch()
            # Idle must hold for DRAIN_SETTLE_S: a response is still being sent for a moment after
            # its execute() returns, and a request is neither queued nor executing while Triton
            # hands it to an instance.
            idle = queued and self._wait_until(lambda load: sum(load.values()) == 0, deadline, settle_s=DRAIN_SETTLE_S)
            self.log("drained" if idle else f"drain timed out after {timeout_s:.0f} s; stopping anyway")
        self.server.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)

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
