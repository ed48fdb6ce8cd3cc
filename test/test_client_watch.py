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
