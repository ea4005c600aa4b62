"""Single requests to a same-host owner go over its unix socket (lmshard.unix_wire), not ZeroMQ.

The owner's side of the socket is the daemon's; here a small owner in a thread serves the
contract (length-prefixed request frames in, length-prefixed reply frames out, on one
connection), beside a plain ROUTER on the ipc endpoint: the client's real OwnerConnections
talk to both, and each side records which requests reached it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from lmshard.client_counters import ClientCounters
from lmshard.config import Config
from lmshard.connections import PROBE_MS, OwnerConnections
from lmshard.forksafe import on_fork_in_child
from lmshard.protocol import pack_reply, unpack_request
from lmshard.unix_client import StreamBroken, UnixStream
from lmshard.unix_wire import CLIENT_MAX_FRAME, FrameBuffer, pack, unix_path
from tests.cluster import Cluster

Request = tuple[bytes | None, int, Any]
"""What an owner saw of a request: (client id, sequence number, body)."""


def reply_to(seq: int, body: Any) -> bytes:
    frame: bytes = pack_reply(seq, 0, ["answered", seq, body if isinstance(body, str) else None])
    return frame


class UnixOwner:
    """An owner's unix socket in a thread: each request frame is answered by ``answer(conn,
    seq, body)``, which by default sends ``reply_to`` behind its length."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list[Request] = []
        self.peer_pids: list[int] = []
        """The pid of the process behind each request's connection (SO_PEERCRED)."""
        self.accepted = 0
        self.answer: Callable[[socket.socket, int, Any], None] = self.reply
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @staticmethod
    def reply(conn: socket.socket, seq: int, body: Any) -> None:
        conn.sendall(pack(reply_to(seq, body)))

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        buf = FrameBuffer()
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                buf.add(data)
                for frame in buf.take_all():
                    _, cid, seq, body, _, _ = unpack_request(frame)
                    self.seen.append((cid, seq, body))
                    self.peer_pids.append(pid)
                    try:
                        self.answer(conn, seq, body)
                    except OSError:
                        return

    def stop(self) -> None:
        self._stop = True
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        os.unlink(self.path)


class RouterOwner:
    """A plain ROUTER on the owner's ipc endpoint in a thread, answering every request."""

    def __init__(self, endpoint: str) -> None:
        self.seen: list[Request] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            if not self._sock.poll(20):
                continue
            ident, frame = self._sock.recv_multipart()
            _, cid, seq, body, _, _ = unpack_request(frame)
            self.seen.append((cid, seq, body))
            self._sock.send_multipart([ident, reply_to(seq, body)])

    def stop(self) -> None:
        self._stop = True
        self._thread.join()
        self._sock.close()
        self._ctx.term()


class Owner:
    """Both sockets of one fake owner (shard 0) and a client's connections to it."""

    def __init__(self, run_dir: Path, **overrides: Any) -> None:
        self.config = Config.default(base_dir=run_dir, shards=1, run_dir=str(run_dir),
                                     data_dir=str(run_dir / "data"), **overrides)
        self.endpoint = self.config.endpoint(0)
        path = unix_path(self.endpoint)
        assert path is not None, self.endpoint
        self.router = RouterOwner(self.endpoint)
        self.unix = UnixOwner(path)
        self.owners = OwnerConnections(self.config, ClientCounters(), timeout_ms=3000,
                                       retries=2)

    def request(self, body: Any) -> Any:
        return self.owners.request(0, 1, body, write=True)

    def close(self) -> None:
        self.owners.close()
        self.unix.stop()
        self.router.stop()


@pytest.fixture
def owner(short_dir: Path) -> Iterator[Owner]:
    o = Owner(short_dir)
    try:
        yield o
    finally:
        o.close()


def test_a_request_goes_over_the_unix_socket(owner: Owner) -> None:
    assert owner.request("first") == ["answered", 1, "first"]
    assert owner.request("second") == ["answered", 2, "second"]
    cid = owner.owners.client_id
    assert owner.unix.seen == [(cid, 1, "first"), (cid, 2, "second")]
    assert owner.unix.accepted == 1  # one connection for both
    assert owner.router.seen == []


def test_a_frame_over_client_max_frame_goes_through_zeromq(owner: Owner) -> None:
    big = "x" * CLIENT_MAX_FRAME
    assert owner.request(big)[:2] == ["answered", 1]
    assert owner.request("small") == ["answered", 2, "small"]
    assert [seq for _, seq, _ in owner.router.seen] == [1]
    assert [seq for _, seq, _ in owner.unix.seen] == [2]


def test_a_connection_closed_mid_request_is_resent_over_the_dealer(owner: Owner) -> None:
    """The owner restarted: its unix connection ends with the request unanswered; the same
    frame goes through ZeroMQ in the same call, which returns once, and later requests use the
    DEALER until a new unix connection is made (at most once a UNIX_RETRY_S)."""
    def hang_up(conn: socket.socket, seq: int, body: Any) -> None:
        conn.shutdown(socket.SHUT_RDWR)

    owner.unix.answer = hang_up
    cid = owner.owners.client_id
    started = time.monotonic()
    assert owner.request("write") == ["answered", 1, "write"]
    assert time.monotonic() - started < 2.0  # not after a timeout (3 s)
    assert owner.unix.seen == [(cid, 1, "write")]
    assert owner.router.seen == [(cid, 1, "write")]  # the same client id and sequence number
    assert owner.owners.counters.total()["unix_fallbacks"] == 1
    assert owner.owners.counters.total()["retries"] == 0  # not after a timeout

    owner.unix.answer = owner.unix.reply  # the owner is back on its socket
    assert owner.request("next") == ["answered", 2, "next"]
    assert [seq for _, seq, _ in owner.router.seen] == [1, 2]  # within UNIX_RETRY_S
    owner.owners._tls.conns[0].unix_retry_at = 0.0  # (as if a second had passed)
    assert owner.request("later") == ["answered", 3, "later"]
    assert [seq for _, seq, _ in owner.unix.seen] == [1, 3]
    assert owner.unix.accepted == 2


def test_a_late_reply_for_an_earlier_sequence_is_skipped(owner: Owner) -> None:
    """A reply left over from an earlier request (one that timed out) is not taken for this
    one's; and a reply may arrive in pieces, across the client's waits."""
    def stale_first(conn: socket.socket, seq: int, body: Any) -> None:
        framed = pack(reply_to(seq, body))
        conn.sendall(pack(reply_to(seq - 1, "stale")) + framed[:3])
        time.sleep(0.02)
        conn.sendall(framed[3:9])
        time.sleep(PROBE_MS / 1000 * 1.5)  # past the client's first wait
        conn.sendall(framed[9:])

    assert owner.request("one") == ["answered", 1, "one"]
    owner.unix.answer = stale_first
    assert owner.request("two") == ["answered", 2, "two"]
    assert owner.router.seen == []


def test_unix_socket_off_uses_zeromq_only(short_dir: Path) -> None:
    o = Owner(short_dir, unix_socket=False)
    try:
        assert o.request("a") == ["answered", 1, "a"]
        assert o.request("b") == ["answered", 2, "b"]
        assert [seq for _, seq, _ in o.router.seen] == [1, 2]
        assert o.unix.seen == [] and o.unix.accepted == 0
    finally:
        o.close()


def exit_code(pid: int, timeout: float = 10.0) -> int | None:
    """Child ``pid``'s exit code; None (and the child killed) if it is still running after
    ``timeout`` seconds (a child stuck on its parent's sockets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_fork_child_opens_its_own_unix_connection(owner: Owner) -> None:
    on_fork_in_child(owner.owners.reset_after_fork)  # as a Client registers it
    assert owner.request("parent") == ["answered", 1, "parent"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if owner.request("child") == ["answered", 1, "child"] else 2
        finally:
            os._exit(code)
    assert exit_code(pid) == 0
    assert owner.request("parent again") == ["answered", 2, "parent again"]
    by_body = {body: p for (_, _, body), p in zip(owner.unix.seen, owner.unix.peer_pids,
                                                  strict=True)}
    assert by_body == {"parent": os.getpid(), "child": pid, "parent again": os.getpid()}
    assert owner.unix.accepted == 2
    assert owner.router.seen == []


def test_close_ends_every_threads_unix_connection(owner: Owner) -> None:
    streams: list[UnixStream | None] = []

    def in_thread() -> None:
        owner.request("from a thread")
        streams.append(owner.owners._tls.conns[0].unix)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    stream = streams[0]
    assert stream is not None and not stream.closed
    owner.owners.close()
    with pytest.raises(StreamBroken):
        stream.send(b"x", 100)  # shut down: the other thread's next use finds it broken


def test_unix_stream_connect_fails_fast_without_an_owner(short_dir: Path) -> None:
    assert UnixStream.connect(str(short_dir / "nothing.u")) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "stale.u"))  # a killed owner's file: bound, not listening
    try:
        assert UnixStream.connect(str(short_dir / "stale.u")) is None
    finally:
        stale.close()


def test_unix_stream_tells_a_closed_connection_from_no_reply_yet(short_dir: Path) -> None:
    path = str(short_dir / "o.u")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        stream = UnixStream.connect(path)
        assert stream is not None
        server, _ = listener.accept()
        stream.send(b"request", 100)
        assert server.recv(100) == pack(b"request")
        assert stream.recv(20) is None  # nothing yet: still usable
        server.sendall(pack(b"one") + pack(b"two")[:5])
        assert stream.recv(20) == b"one"
        assert stream.recv(20) is None
        server.sendall(pack(b"two")[5:])
        assert stream.recv(20) == b"two"
        server.close()
        with pytest.raises(StreamBroken):
            stream.recv(20)
        assert stream.closed
    finally:
        listener.close()


# -- against real owners --------------------------------------------------------------------


def open_unix_connections(path: str) -> int:
    """How many connected sockets carry ``path`` as their name (the owner's side of each
    accepted connection does), from /proc/net/unix."""
    with open("/proc/net/unix") as f:
        return sum(1 for line in f if line.split()[-1] == path and line.split()[5] == "03")


def test_real_owners_are_reached_over_their_unix_sockets(tmp_path: Path) -> None:
    """Single puts, increments and a batch whose ops all go to one shard: over the unix
    sockets alone (the DEALERs are closed halfway)."""
    cluster = Cluster(tmp_path, shards=2)
    cluster.start()
    try:
        paths = [unix_path(cluster.config.endpoint(s)) for s in range(2)]
        assert all(p is not None and os.path.exists(p) for p in paths), paths
        with cluster.client() as c:
            for i in range(20):
                c.put("blobs", i, b"v%d" % i)
            assert c.incr("counters", "hits") == 1
            conns = c.owners._tls.conns
            for s in conns:
                assert conns[s].unix is not None, s
                assert open_unix_connections(paths[s]) == 1
                conns[s].sock.close(linger=0)  # nothing more may go through ZeroMQ
            for i in range(20):
                c.put("blobs", i, b"w%d" % i)
            assert c.incr("counters", "hits", 9) == 10
            assert [c.get("blobs", i) for i in range(20)] == [b"w%d" % i for i in range(20)]
            blobs = c.table("blobs")
            one = [i for i in range(20) if blobs.shard(i, blobs.kenc(i)) == 1]
            with c.batch() as b:  # every op to shard 1: the one-shard request's path
                for i in one:
                    b.put("blobs", i, b"x%d" % i)
            assert [c.get("blobs", i) for i in one] == [b"x%d" % i for i in one]
            assert c.counters()["timeouts"] == 0
    finally:
        cluster.stop()

