"""The group commit's wait: who counts as an active writer, and the wait on a ZeroMQ socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from lmshardd.grouping import ActiveWriters, wait_readable


def test_active_writers_forget_clients_silent_for_a_window() -> None:
    w = ActiveWriters(window=0.1)
    w.note([(b"i", b"a", 1, []), (b"j", b"b", 1, [])], now=10.0)
    assert w.count(10.0) == 2
    w.note([(b"i", b"a", 2, [])], now=10.08)
    assert w.count(10.08) == 2
    assert w.count(10.15) == 1  # b last wrote at 10.0
    assert w.count(10.5) == 0


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    router.bind("inproc://grouping")
    dealer.connect("inproc://grouping")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)
    ctx.term()


def test_wait_readable_times_out_without_input(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    router, _ = pair
    assert not wait_readable(router, 0.0005)


def test_wait_readable_sees_waiting_and_arriving_messages(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    router, dealer = pair
    dealer.send(b"one")
    assert wait_readable(router, 0.5)
    assert router.recv_multipart()[1] == b"one"
    assert not wait_readable(router, 0.0)
    # A message sent while the wait is on ends it (ZMQ_FD is edge-triggered: it was re-armed).
    sender = threading.Timer(0.02, dealer.send, (b"two",))
    sender.start()
    try:
        t = time.monotonic()
        assert wait_readable(router, 5.0)
        assert time.monotonic() - t < 4.0
    finally:
        sender.join()
    assert router.recv_multipart()[1] == b"two"
