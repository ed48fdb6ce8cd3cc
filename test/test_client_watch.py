"""client_watch.ClientWatch: while a public instance waits on the encoder, its client is asked
after at once, then less and less often; a client found gone has its request marked (and the mark
cleared once the wait ends); the client is never asked after the wait has ended."""

from __future__ import annotations

import itertools
import threading
import time

from nvembed_triton.serving.client_watch import ClientWatch


class Board:
    def __init__(self):
        self.marked, self.cleared = [], []


def watch_for(board: Board, first_s: float = 0.05, max_s: float = 0.1) -> ClientWatch:
    return ClientWatch(board.marked.append, board.cleared.append, first_s, max_s)


class Client:
    """is_gone() for the watcher: records when it was asked, and whether a wait was open then."""

    def __init__(self, gone_after_asks: int | None = None):
        self.asked_at: list[float] = []
        self.gone_after_asks = gone_after_asks
        self.waiting = False
        self.asked_outside_a_wait = False

    def is_gone(self) -> bool:
        self.asked_outside_a_wait |= not self.waiting
        self.asked_at.append(time.monotonic())
        time.sleep(0.005)  # an IPC call takes a while: the wait must not end meanwhile
        return self.gone_after_asks is not None and len(self.asked_at) >= self.gone_after_asks


def wait_under(watch: ClientWatch, client: Client, token: str, seconds: float) -> bool:
    """One wait on the encoder of `seconds`; whether the client was found gone."""
    with watch.watching(client.is_gone, token) as gone:
        client.waiting = True
        started = time.monotonic()
        while time.monotonic() - started < seconds and not gone():
            time.sleep(0.005)
        client.waiting = False
        return gone()


def test_the_client_is_asked_at_once_then_less_often_and_never_after_the_wait():
    board, client = Board(), Client()
    watch = watch_for(board, first_s=0.3, max_s=0.6)
    started = time.monotonic()
    assert not wait_under(watch, client, "t1", 1.2)  # asks due at ~0, 0.3 and 0.9 s; the next at 1.5
    time.sleep(0.6)  # the watcher's next ask would have come by now
    offsets = [at - started for at in client.asked_at]
    assert len(offsets) == 3 and offsets[0] < 0.2, offsets  # at once: it may have gone while its request was queued
    gaps = [later - earlier for earlier, later in itertools.pairwise(offsets)]
    assert gaps[0] >= 0.29 and gaps[1] >= 0.59, offsets  # first_s, then twice that (max_s)
    assert not client.asked_outside_a_wait
    assert board.marked == board.cleared == []


def test_a_client_gone_while_queued_is_found_at_once_marked_and_the_mark_cleared_after():
    board, client = Board(), Client(gone_after_asks=1)
    watch = watch_for(board, first_s=10, max_s=10)
    started = time.monotonic()
    assert wait_under(watch, client, "t2", 5.0)
    assert time.monotonic() - started < 1.0  # found by the first ask, not the one after first_s
    assert board.marked == ["t2"] and board.cleared == ["t2"]


def test_a_client_leaving_later_is_found_by_a_later_ask():
    board, client = Board(), Client(gone_after_asks=3)
    assert wait_under(watch_for(board), client, "t3", 5.0)
    assert len(client.asked_at) == 3 and board.marked == ["t3"] == board.cleared


def test_each_wait_is_watched_on_its_own_one_after_another():
    board = Board()
    watch = watch_for(board, first_s=10, max_s=10)
    clients = [Client(gone_after_asks=1 if i == 2 else None) for i in range(4)]
    found = [wait_under(watch, client, f"t{i}", 0.2) for i, client in enumerate(clients)]
    assert found == [False, False, True, False]
    assert [len(client.asked_at) for client in clients] == [1, 1, 1, 1]  # each asked at once, once
    assert board.marked == ["t2"] == board.cleared
    assert not any(client.asked_outside_a_wait for client in clients)


def test_close_stops_the_watcher():
    before = set(threading.enumerate())
    watch = watch_for(Board())
    (watcher,) = set(threading.enumerate()) - before
    watch.close()
    watcher.join(5)
    assert not watcher.is_alive()


def test_requests_watched_at_once_are_each_asked_on_their_own_schedule_and_never_after_their_wait():
    board = Board()
    watch = watch_for(board, first_s=0.1, max_s=0.2)
    clients = [Client(gone_after_asks=2 if i == 1 else None) for i in range(3)]
    waits = [0.5, 0.8, 0.3]
    found = [None] * 3

    def wait(i):
        found[i] = wait_under(watch, clients[i], f"t{i}", waits[i])

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    time.sleep(0.3)  # any ask after a wait would have come by now
    assert found == [False, True, False]
    assert board.marked == ["t1"] == board.cleared
    assert all(len(client.asked_at) >= 2 for client in clients)  # at once, then after first_s
    assert not any(client.asked_outside_a_wait for client in clients)


class SlowClient(Client):
    """Its ask takes long (a busy tritonserver): another request's wait must end meanwhile."""

    def is_gone(self) -> bool:
        self.asked_outside_a_wait |= not self.waiting
        self.asked_at.append(time.monotonic())
        time.sleep(1.0)
        return False


def test_a_wait_ends_while_another_requests_client_is_being_asked_but_not_during_its_own_ask():
    board = Board()
    watch = watch_for(board, first_s=10, max_s=10)
    slow, quick = SlowClient(), Client()
    slow_wait = threading.Thread(target=wait_under, args=(watch, slow, "slow", 0.05))
    slow_wait.start()
    time.sleep(0.2)  # the slow client's first ask is in progress
    started = time.monotonic()
    wait_under(watch, quick, "quick", 0.05)
    assert time.monotonic() - started < 0.5  # not held up by the other request's ask
    slow_wait.join(5)
    assert slow.asked_at and time.monotonic() - slow.asked_at[0] >= 0.95  # its wait ended only after its own ask
    assert not slow.asked_outside_a_wait and not quick.asked_outside_a_wait


def test_an_ask_that_fails_is_made_again_later():
    board = Board()
    watch = watch_for(board, first_s=0.05, max_s=0.05)
    asked = []

    def is_gone():
        asked.append(time.monotonic())
        if len(asked) == 1:
            raise RuntimeError("the IPC call failed")
        return len(asked) >= 3

    with watch.watching(is_gone, "t") as gone:
        deadline = time.monotonic() + 5
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone()
    assert len(asked) == 3 and board.marked == ["t"] == board.cleared
