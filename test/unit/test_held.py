"""held.Held and deadlines.Deadlines: a held request is asked after its client only until it is
claimed for its answer, only one caller claims it, and a deadline calls at its time whatever else
is registered."""

import threading
import time

from nvembed_triton.model.deadlines import Deadlines
from nvembed_triton.model.held import Held


class Request:
    """Stands in for a pb_utils request: counts the asks, and fails one made after the final response."""

    def __init__(self, cancelled=False, ask_s=0.0):
        self.cancelled, self.ask_s = cancelled, ask_s
        self.asks, self.sent, self.asked_after_send = 0, [], False

    def is_cancelled(self):
        self.asked_after_send |= bool(self.sent)
        self.asks += 1
        time.sleep(self.ask_s)
        return self.cancelled

    def send(self, response):
        self.sent.append(response)


def held_for(request, deadline=None):
    return Held(request.is_cancelled, request.send, taken=time.monotonic(), deadline=deadline)


def test_the_client_is_asked_until_the_request_is_claimed_and_never_after():
    request = Request(cancelled=False)
    held = held_for(request)
    assert not held.client_left(time.monotonic()) and request.asks == 1
    assert held.claim()
    held.send_final("answer")
    assert held.client_left(time.monotonic())  # answered: gone for every purpose, and not asked
    assert request.asks == 1 and not request.asked_after_send


def test_only_the_first_claim_counts():
    held = held_for(Request())
    claims = []
    threads = [threading.Thread(target=lambda: claims.append(held.claim())) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claims.count(True) == 1 and held.answered and held.request is None


def test_a_claim_waits_for_an_ask_in_progress():
    """The ask runs under the lock: the answer cannot be sent while the request is being asked."""
    request = Request(ask_s=0.3)
    held = held_for(request)
    asking = threading.Thread(target=held.client_left, args=(time.monotonic(),))
    asking.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert held.claim()
    held.send_final("answer")
    asking.join()
    assert time.monotonic() - started >= 0.2 and not request.asked_after_send


def test_a_deadline_passes_at_its_time():
    held = held_for(Request(), deadline=time.monotonic() + 0.1)
    assert not held.timed_out(time.monotonic())
    assert held.timed_out(time.monotonic() + 0.2)
    assert not held_for(Request()).timed_out(time.monotonic() + 1e6)  # no timeout of its own


def test_deadlines_call_at_their_times_in_order_an_earlier_one_added_later_too():
    deadlines = Deadlines()
    called, now = [], time.monotonic()
    try:
        deadlines.at(now + 0.6, lambda: called.append(("late", time.monotonic() - now)))
        deadlines.at(now + 0.2, lambda: called.append(("early", time.monotonic() - now)))  # wakes the waiting thread
        deadlines.at(now + 0.3, lambda: 1 / 0)  # a failing call ends neither the thread nor the others
        time.sleep(0.9)
    finally:
        deadlines.close()
    assert [name for name, _ in called] == ["early", "late"]
    assert 0.2 <= called[0][1] < 0.4 and 0.6 <= called[1][1] < 0.8
    assert deadlines.pending() == 0
