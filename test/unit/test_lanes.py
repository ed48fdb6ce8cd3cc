"""lanes.Lanes: where a request goes, what a lane takes at once, what it refuses, and that a short
request is answered while the long lane is busy."""

import threading
import time

from nvembed_triton.model.lanes import LaneLimits, Lanes

LIMITS = LaneLimits(max_requests=3, max_bytes=1000, batch_bytes=100)


class Recorder:
    """A run_batch that records each batch; the long lane's first batch can be held."""

    def __init__(self):
        self.batches: list[tuple[str, list]] = []
        self.release_long = threading.Event()
        self.long_started = threading.Event()
        self.done = threading.Condition()

    def __call__(self, batch, lane):
        lane = f"{lane.name}-lane"
        if lane == "long-lane" and not self.release_long.is_set():
            self.long_started.set()
            self.release_long.wait(10)
        with self.done:
            self.batches.append((lane, list(batch)))
            self.done.notify_all()

    def wait_for(self, count: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.batches) >= count, timeout=10)


def test_a_short_request_is_answered_while_the_long_lane_computes():
    recorder = Recorder()
    lanes = Lanes(recorder, long_request_bytes=50, limits=LIMITS)
    try:
        assert lanes.submit("long", 500)
        assert recorder.long_started.wait(10)
        assert lanes.submit("short", 10)
        recorder.wait_for(1)
        assert recorder.batches == [("short-lane", ["short"])]  # the long one is still computing
        recorder.release_long.set()
        recorder.wait_for(2)
        assert recorder.batches[1] == ("long-lane", ["long"])
    finally:
        recorder.release_long.set()
        lanes.close(5)


def test_a_free_lane_takes_what_waits_up_to_its_batch_bytes():
    recorder = Recorder()
    recorder.release_long.set()
    hold = threading.Event()
    lanes = Lanes(lambda batch, lane: (hold.wait(10), recorder(batch, lane)), long_request_bytes=50, limits=LIMITS)
    try:
        assert lanes.submit("a", 40)
        time.sleep(0.1)  # "a" is taken at once and computes until `hold` is set
        for name in ("b", "c", "d"):  # these wait; 40 + 40 fit in batch_bytes 100, a third does not
            assert lanes.submit(name, 40)
        hold.set()
        recorder.wait_for(3)
        assert [batch for _, batch in recorder.batches] == [["a"], ["b", "c"], ["d"]]
    finally:
        hold.set()
        lanes.close(5)


def test_a_full_lane_refuses_but_an_empty_one_takes_any_one_request():
    hold = threading.Event()
    lanes = Lanes(lambda batch, lane: hold.wait(10), long_request_bytes=50, limits=LIMITS)
    assert lanes.submit("huge", 5000)  # over max_bytes, but the long lane is empty
    assert lanes.submit("short 0", 10)
    time.sleep(0.1)  # both taken: computing
    assert [lanes.submit(f"long {i}", 400) for i in range(4)] == [True, True, False, False]  # 1000 bytes at most
    assert [lanes.submit(f"short {i}", 10) for i in range(1, 6)] == [True, True, True, False, False]  # 3 requests
    left = lanes.close(0.1)  # before the batches being computed end: what waits is handed back
    hold.set()
    assert sorted(left) == ["long 0", "long 1", "short 1", "short 2", "short 3"]
    assert not lanes.submit("late", 10)
