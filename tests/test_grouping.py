"""The group commit's wait: who counts as an active writer, and the wait on a ZeroMQ socket."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import lmshard
import lmshardd.owner as owner_module
from lmshard import protocol
from lmshard.unix_wire import pack
from lmshardd.grouping import ActiveWriters, wait_readable
from lmshardd.owner import GROUP_LINGER_MAX, ShardOwner
from lmshardd.unix_peers import UnixServer
from tests.cluster import Cluster


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


def test_wait_readable_wakes_for_a_request_from_a_unix_socket_client(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]], tmp_path: Path,
) -> None:
    router, _ = pair
    poller = zmq.Poller()
    server = UnixServer(str(tmp_path / "owner.sock.u"), poller)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(server.path)
        while not server.peers:
            server.on_ready(dict(poller.poll(1000)))
        assert not wait_readable(router, 0.0005, server)
        frame = protocol.PING.frame(None, 7)
        client.sendall(pack(frame)[:3])  # part of a request does not end the wait
        sender = threading.Timer(0.05, client.sendall, (pack(frame)[3:],))
        sender.start()
        try:
            t = time.monotonic()
            assert wait_readable(router, 5.0, server)
            assert time.monotonic() - t < 4.0
        finally:
            sender.join()
        assert [f for _, f in server.frames] == [frame]
    finally:
        client.close()
        server.close()


# --------------------------------------------------------------------------------------------
# The owner's wait, in this process
# --------------------------------------------------------------------------------------------


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Any]:
    cl = Cluster(tmp_path, shards=1)
    o = ShardOwner(cl.config, 0)
    o.bind()
    try:
        yield o
    finally:
        o.close()
        shutil.rmtree(cl.run_dir, ignore_errors=True)


def test_owner_waits_only_for_active_writers_missing_from_the_group(
    owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    def recording_wait(sock: zmq.Socket[bytes], timeout: float, more: Any = None) -> bool:
        waits.append(timeout)
        return wait_readable(sock, timeout, more)

    monkeypatch.setattr(owner_module, "wait_readable", recording_wait)
    owner._writers = ActiveWriters(window=60.0)  # no writer goes quiet during the test
    owner._group_avg, owner._commit_avg = 3.0, 1.0  # groups have formed: waiting is on
    with lmshard.connect(owner.config) as c:
        blobs = c.table("blobs")
        tid = blobs.tid
        kenc = blobs.kenc
    ctx = zmq.Context()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]
    try:
        for d in dealers:
            d.connect(owner.config.endpoint(0))
        seq = 0

        def round_of(senders: list[zmq.Socket[bytes]]) -> int:
            nonlocal seq
            seq += 1
            for i, d in enumerate(dealers):
                if d in senders:
                    op = protocol.op(protocol.OP_PUT, tid, kenc(seq * 10 + i), b"x")
                    d.send(protocol.WRITE.frame(bytes([i]) * 16, seq, [op]))
            time.sleep(0.2)  # every request is in the owner's socket before it drains
            n = owner.serve_once(owner.sock)
            for d in senders:
                assert d.poll(5000)
                rseq, status, _ = protocol.unpack_frame(d.recv())
                assert (rseq, status) == (seq, 0)
            return n

        assert round_of(dealers) == 3
        assert waits == []  # the group holds every active writer: it commits at once
        assert round_of(dealers[:2]) == 2
        assert waits and max(waits) <= GROUP_LINGER_MAX  # the third one was waited for, briefly
        assert owner.counters.group_sizes[-2:] == [3, 2]
    finally:
        for d in dealers:
            d.close(linger=0)
        ctx.term()
