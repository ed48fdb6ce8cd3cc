"""The supervisor's own decisions, with a stand-in for the tritonserver it watches (the real
server's drain and restarts are tested end to end in test_server_safety.py)."""

import threading
import time

from nvembed_triton.supervisor import Supervisor


class RunningServer:
    """What the supervisor asks of a healthy TritonServer between restarts."""

    def is_running(self):
        return True

    def stubs(self):
        return []


def supervisor_with(probe):
    return Supervisor(RunningServer(), probe, closed_flag=None, log=lambda message: None)


def test_a_stop_does_not_wait_for_a_health_probe_queued_behind_real_work():
    released = threading.Event()
    supervisor = supervisor_with(lambda: released.wait(60))  # a probe behind a minute of work
    threading.Timer(0.2, supervisor.stop.set).start()
    started = time.monotonic()
    try:
        assert supervisor._problem(set(), probe_due=True) is None
        assert time.monotonic() - started < 5  # the drain can start now, not when the probe returns
    finally:
        released.set()


def test_a_failed_probe_is_a_problem_and_a_passed_one_is_not():
    def failing():
        raise RuntimeError("norm 0.0")

    assert supervisor_with(failing)._problem(set(), probe_due=True) == "health probe failed: norm 0.0"
    assert supervisor_with(lambda: None)._problem(set(), probe_due=True) is None
