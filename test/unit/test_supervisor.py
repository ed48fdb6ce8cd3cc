"""The supervisor's decisions, against a stand-in for the tritonserver it watches whose metrics are
served over real HTTP by prometheus-client (the real server's restarts and drain are tested end to
end in test_server_safety.py)."""

import threading
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from tritonclient.utils import InferenceServerException

from nvembed_triton.launcher.serve import is_busy
from nvembed_triton.launcher.server import free_port
from nvembed_triton.launcher.supervisor import Supervisor, Timings

FAST = Timings(stub_check_s=0.05, health_interval_s=0.1, health_timeout_s=0.5, health_failures=3, stall_timeout_s=0.5,
               load_check_s=0.05)


@dataclass
class FakeStub:
    instance: str
    cpu: float = 0.0

    def cpu_s(self) -> float:
        return self.cpu


class Metrics:
    """Triton's load and progress series, served by prometheus-client on a free port."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.pending = Gauge("nv_inference_pending_request_count", "", ["model"], registry=self.registry)
        self.executing = Gauge("nvembed_requests_executing", "", ["model"], registry=self.registry)
        # Triton's counters have no _total suffix, which prometheus-client's Counter would add.
        self.success = Gauge("nv_inference_request_success", "", ["model"], registry=self.registry)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def close(self):
        self.server.shutdown()


@dataclass
class Settings:
    metrics_url: str


@dataclass
class StandInServer:
    """What the supervisor asks of a running TritonServer."""

    metrics_url: str
    stub_list: list = field(default_factory=lambda: [FakeStub("m_0_0"), FakeStub("m_0_1")])
    live: bool = True

    @property
    def settings(self):
        return Settings(self.metrics_url)

    def is_running(self):
        return True

    def stubs(self):
        return list(self.stub_list)

    def is_live(self, timeout_s):
        return self.live

    def expected_stubs(self):
        return 2


@pytest.fixture
def metrics():
    served = Metrics()
    yield served
    served.close()


def supervisor(server, probe=lambda: None):
    return Supervisor(server, probe, closed_flag=None, log=lambda message: None, timings=FAST, is_busy=is_busy)


def first_problem(supervisor, within_s: float, slowest_call_s: list | None = None) -> str | None:
    """Runs the supervisor's checks as its loop does, for up to within_s; the first problem it sees."""
    from nvembed_triton.launcher.supervisor import Watch

    watch, deadline = Watch(supervisor), time.monotonic() + within_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        problem = supervisor.problem(watch)
        if slowest_call_s is not None:
            slowest_call_s.append(time.monotonic() - started)
        if problem:
            return problem
        time.sleep(FAST.stub_check_s)
    return None


def test_a_probe_waiting_behind_real_work_holds_up_nothing(metrics):
    """A probe that waits a minute is no failure, and a stub that dies meanwhile is still seen at once
    (the old supervisor waited on its probe: a death went unseen for up to 60 s)."""
    released = threading.Event()
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")
    watcher = supervisor(server, probe=lambda: released.wait(60))
    calls: list[float] = []
    try:
        assert first_problem(watcher, within_s=0.5, slowest_call_s=calls) is None
        threading.Timer(0.3, lambda: server.stub_list.pop()).start()
        problem = first_problem(watcher, within_s=2, slowest_call_s=calls)
    finally:
        released.set()
    assert problem == "the stub process of m_0_1 died"
    assert max(calls) < 0.2


def test_a_wrong_answer_is_a_problem_and_a_busy_one_is_not(metrics):
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")

    def wrong():
        raise RuntimeError("the probe's embedding has norm 0.0, not 1")

    def full_queue():
        raise InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")

    def dead_stub():
        raise InferenceServerException("Stub process 'm_0_0' is not healthy.", status="StatusCode.INTERNAL")

    assert first_problem(supervisor(server, wrong), 2) == "health probe failed: the probe's embedding has norm 0.0, not 1"
    assert "not healthy" in first_problem(supervisor(server, dead_stub), 2)
    assert first_problem(supervisor(server, full_queue), 1) is None


def test_unanswered_liveness_checks_in_a_row_are_a_problem(metrics):
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics", live=False)
    assert first_problem(supervisor(server), 3) == "tritonserver did not answer 3 liveness checks in a row"


def test_waiting_work_without_progress_is_a_stall(metrics):
    """Requests wait, none completes and the model uses no CPU: a problem after stall_timeout_s."""
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")
    metrics.executing.labels(model="m").set(2)
    started = time.monotonic()
    problem = first_problem(supervisor(server), 8)
    assert problem is not None and problem.startswith("no progress for") and "2 request(s) waiting" in problem
    assert time.monotonic() - started >= FAST.stall_timeout_s


def test_the_health_file_says_not_ready_from_a_third_of_the_stall_until_the_restart(metrics, tmp_path):
    """A stuck model behind a live tritonserver (Triton's own readiness stays true): the supervisor's
    health file, which the OpenAI front's readiness reads, says so well before the restart."""
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")
    metrics.executing.labels(model="m").set(2)
    health = tmp_path / "health"
    watcher = Supervisor(server, lambda: None, closed_flag=tmp_path / "closed", log=lambda message: None, timings=FAST,
                         is_busy=is_busy, health_file=health)  # fmt: skip
    restarts = []
    watcher.restart = lambda: (restarts.append(time.monotonic()), watcher.stop.set())  # the real one needs a tritonserver
    states = []

    def read_health():
        while not watcher.stop.is_set():
            states.append((time.monotonic(), health.read_text().strip() if health.exists() else None))
            time.sleep(0.01)

    reader = threading.Thread(target=read_health)
    reader.start()
    started = time.monotonic()
    watcher.run()
    reader.join()
    doubted = [when for when, state in states if state and state.startswith("not ready: no progress")]
    assert states[0][1] in (None, "ready") and doubted and restarts
    assert FAST.stall_timeout_s / 3 <= doubted[0] - started < restarts[0] - started
    assert health.read_text().startswith("not ready: restarting (no progress for")


def test_a_long_computation_or_completions_are_progress(metrics):
    """The same wait, but the model computes (its CPU time grows) or requests complete: no problem."""
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")
    metrics.executing.labels(model="m").set(2)
    stop = threading.Event()

    def compute():
        while not stop.wait(0.1):
            server.stub_list[0].cpu += 0.1  # one core, busy

    threading.Thread(target=compute, daemon=True).start()
    try:
        assert first_problem(supervisor(server), 4 * FAST.stall_timeout_s) is None
    finally:
        stop.set()

    def complete():
        while not stop.wait(0.3):
            metrics.success.labels(model="m").inc()

    stop.clear()
    threading.Thread(target=complete, daemon=True).start()
    try:
        assert first_problem(supervisor(server), 4 * FAST.stall_timeout_s) is None
    finally:
        stop.set()


def test_idle_is_never_a_stall(metrics):
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics")
    assert first_problem(supervisor(server), 3 * FAST.stall_timeout_s) is None


def test_a_stub_that_died_before_it_was_first_seen_is_seen_by_the_count(metrics):
    """The config asks for two stubs (two GPUs); only one was ever there."""
    server = StandInServer(f"http://127.0.0.1:{metrics.port}/metrics", stub_list=[FakeStub("m_0_0")])
    assert first_problem(supervisor(server), 1) == "1 of 2 stub processes are gone"
