"""The client side of the reader pool: remote reads from every shard, load-balanced.

The pool is ``readers.count`` processes (``lmshardd readers --index I``), each with every shard
open read-only and its own endpoint: reader 0 binds ``readers.endpoint`` itself, reader I the
same endpoint with the port plus I (tcp) or ``-I`` before the file suffix (ipc), see
``reader_endpoints``. There is no broker: a ``ReaderPool`` talks to the readers directly, one
DEALER socket per reader and thread, so a request costs one hop each way, no broker can be
lost, and reads scale with the number of readers. Each thread has a home reader picked at
random (clients spread over the pool); the requests of one ``requests`` call go to consecutive
readers at once. A reader that is not connected is skipped (``ZMQ_IMMEDIATE``); a request left
unanswered is resent to the next reader after the timeout (Lazy Pirate: a new socket, the same
request; reads are idempotent).

On the wire a pool request is an ordinary request frame (``lmshard.protocol``) with command
``read`` and body ``[shard, command code, that command's body]``, where the command is one of
the owner's read commands (``protocol.READ_COMMANDS``) with its usual body and reply. ``ping``
is answered by whichever reader gets it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import zmq

from lmshard import protocol, security
from lmshard.config import Config, ConfigError, check_reader_endpoints, derive_reader_endpoint
from lmshard.contexts import OwnedContext
from lmshard.errors import Error, LimitExceeded, ShardUnavailable, error_from_wire
from lmshard.forksafe import check_fork, on_fork_in_child
from lmshard.protocol import PING, READ, READ_CODES, READ_COMMANDS, SCAN, SCAN_PAGE, paged_scan

log = logging.getLogger("lmshard.remote")

MAX_SOCKET_TIMEOUT_MS = 2**31 - 1
"""ZeroMQ's socket timeouts are C ints (milliseconds)."""
CONNECT_WAIT_MS = 250
"""How long a send waits for a reader's connection before it tries the next reader."""


def reader_endpoint(config: Config, index: int) -> str:
    """The endpoint reader ``index`` binds: ``readers.endpoint`` for reader 0, then the port
    plus ``index`` (tcp) or ``-<index>`` before the file suffix (ipc)."""
    return derive_reader_endpoint(config.reader_endpoint, index)


def reader_endpoints(config: Config) -> list[str]:
    """Every reader's endpoint, checked (``load_config`` has checked them already): ConfigError
    for a derived endpoint that collides with another configured endpoint, passes port 65535
    or the unix socket path limit, and when ``readers.count`` is 0."""
    if config.readers < 1:
        raise ConfigError(
            "readers.count is 0: this service runs no reader pool",
            key="readers.count", file=config.path,
            hint="set readers.count >= 1 (and regenerate supervisord.conf), or read through "
            "the shard owners",
        )
    check_reader_endpoints(config)
    return config.reader_endpoints()


class _PoolConn:
    """One thread's sockets, one per reader (made on first use), and its home reader."""

    __slots__ = ("socks", "home", "seq")

    def __init__(self, readers: int) -> None:
        self.socks: list[zmq.Socket[bytes] | None] = [None] * readers
        self.home = random.randrange(readers)  # spreads clients over the readers
        self.seq = 0


class ReaderPool:
    """Remote reads through the reader pool; safe to share between threads (each thread has
    its own sockets). ``request`` raises the typed error a reader answered with, and
    ShardUnavailable when no reader answers through every retry.

    Each thread sends to one home reader, picked at random, so many clients spread over the
    pool while one client's requests find a reader that is already awake (on a busy host that
    is a third faster than alternating); the parts of ``requests`` go to consecutive readers
    and are served in parallel. A reader that is not connected is skipped at once; a request
    that is not answered in time is resent to the next reader (Lazy Pirate), which becomes the
    thread's new home.
    """

    def __init__(self, config: Config, *, timeout_ms: int | None = None,
                 retries: int | None = None) -> None:
        self.config = config
        self.endpoints = reader_endpoints(config)
        self.timeout_ms = config.timeout_ms if timeout_ms is None else timeout_ms
        self.retries = config.retries if retries is None else retries
        self.shards = config.shards
        self.counters = {"requests": 0, "retries": 0, "timeouts": 0}
        self._ctx: zmq.Context[Any] | None = None
        self._tls = threading.local()
        self._closed = False
        on_fork_in_child(self.reset_after_fork)  # sockets must not cross fork()

    # -- sockets -----------------------------------------------------------------------------

    def _context(self) -> zmq.Context[Any]:
        """The pool's ZeroMQ context, made on first use (after fork: the child's own)."""
        if self._ctx is None:
            self._ctx = OwnedContext()
        return self._ctx

    def _socket(self, endpoint: str) -> zmq.Socket[bytes]:
        if self._closed:
            raise Error("this reader pool is closed", hint="make a new ReaderPool")
        sock: zmq.Socket[bytes] = self._context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Sends wait for a connection instead of queueing for a reader that is down.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_SIZE + 1024)
        sock.setsockopt(zmq.RCVTIMEO, min(self.timeout_ms, MAX_SOCKET_TIMEOUT_MS))
        try:
            security.secure_client(sock, self.config, endpoint)
            sock.connect(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _conn(self) -> _PoolConn:
        conn: _PoolConn | None = getattr(self._tls, "conn", None)
        if conn is None:
            conn = self._tls.conn = _PoolConn(len(self.endpoints))
        return conn

    def _sock(self, conn: _PoolConn, i: int) -> zmq.Socket[bytes]:
        sock = conn.socks[i]
        if sock is None:
            sock = conn.socks[i] = self._socket(self.endpoints[i])
        return sock

    def _drop(self, conn: _PoolConn, i: int) -> None:
        sock = conn.socks[i]
        if sock is not None:
            sock.close(linger=0)
            conn.socks[i] = None

    def _send(self, conn: _PoolConn, i: int, frame: bytes, deadline: float) -> int | None:
        """Send to reader ``i``, or the next connected one; the reader it went to, or None."""
        m = len(self.endpoints)
        copy = len(frame) < protocol.ZERO_COPY_MIN
        for k in range(m):
            j = (i + k) % m
            fresh = conn.socks[j] is None
            sock = self._sock(conn, j)
            # A new socket gets a moment to connect; an old one that is not connected (its
            # reader is down, ZeroMQ keeps reconnecting in the background) is skipped at once.
            left_ms = int((deadline - time.monotonic()) * 1000)
            sock.setsockopt(zmq.SNDTIMEO, max(0, min(CONNECT_WAIT_MS, left_ms)) if fresh else 0)
            try:
                sock.send(frame, 0, copy)
                return j
            except zmq.Again:
                continue
        return None

    # -- requests ----------------------------------------------------------------------------

    def request(self, shard: int, code: int, body: Any, *, map_version: int = 0) -> Any:
        """One read command for one shard, routed by the slot map of ``map_version`` (a shard
        that recorded a newer one answers SlotMoved for a key it does not hold); its reply
        body."""
        check_fork()
        conn: _PoolConn | None = getattr(self._tls, "conn", None)
        sock = conn.socks[conn.home] if conn is not None else None
        if sock is None or code not in READ_CODES or type(shard) is not int or not (
                0 <= shard < self.shards):
            r = self.requests([(shard, code, body)])[0]
            if isinstance(r, Error):
                raise r
            return r
        # The common case, kept lean: the home reader is connected and answers in time.
        assert conn is not None
        self.counters["requests"] += 1
        seq, frame = self._frame(conn, *READ.request_for(shard, code, body),
                                 map_version=map_version)
        try:
            sock.send(frame, zmq.NOBLOCK, len(frame) < protocol.ZERO_COPY_MIN)
        except zmq.Again:  # not connected any more: the full path picks another reader
            return self._request_again(conn, seq, frame, shard, code, body, False)
        try:
            reply = sock.recv()  # RCVTIMEO
        except zmq.Again:
            return self._request_again(conn, seq, frame, shard, code, body, True)
        try:
            rseq, status, rbody = protocol.unpack_frame(reply)
            if rseq == seq:
                if status == 0:
                    return rbody
                err = error_from_wire(status, *rbody)
            else:
                err = None
        except Exception:  # an undecodable reply: ask again
            log.warning("the reader pool sent an undecodable reply: dropped")
            err = None
        if err is None:  # a stale or undecodable reply
            return self._request_again(conn, seq, frame, shard, code, body, False)
        raise err

    def _request_again(self, conn: _PoolConn, seq: int, frame: bytes, shard: int, code: int,
                       body: Any, timed_out: bool) -> Any:
        """``request`` when its first attempt was not sent, not answered in time, or answered
        with something else: the rest of the attempts through the full path."""
        parts = [(shard, code, body)]
        attempts = self.retries + 1
        if timed_out:  # a fresh socket on the next reader: no late reply is read as an answer
            self.counters["timeouts"] += 1
            self._drop(conn, conn.home)
            conn.home = (conn.home + 1) % len(self.endpoints)
            attempts -= 1
            if not attempts:
                raise self._unavailable(parts)
            self.counters["retries"] += 1
        r = self._exchange(conn, [(seq, frame)], parts, attempts)[0]
        if isinstance(r, Error):
            raise r
        return r

    def requests(self, parts: Sequence[tuple[int, int, Any]], *, map_version: int = 0
                 ) -> list[Any]:
        """Several read commands at once (they go to different readers), routed by the slot
        map of ``map_version``; their reply bodies in order, or the Error a reader answered
        with in place of a body."""
        check_fork()
        if not parts:
            return []
        frames = []
        conn = self._conn()
        for shard, code, body in parts:
            if type(shard) is not int or not 0 <= shard < self.shards:
                raise ValueError(f"shard {shard!r} out of range 0..{self.shards - 1}")
            if code not in READ_CODES:
                raise ValueError(f"the reader pool serves only {', '.join(READ_COMMANDS)}")
            frames.append(self._frame(conn, *READ.request_for(shard, code, body),
                                      map_version=map_version))
        self.counters["requests"] += len(frames)
        return self._exchange(conn, frames, parts)

    def ping(self) -> dict[str, Any]:
        """The health of whichever reader answers: index, pid, shards open, counters."""
        conn = self._conn()
        t = time.perf_counter()
        r: dict[str, Any] | Error = self._exchange(
            conn, [self._frame(conn, *PING.request_for())], None)[0]
        if isinstance(r, Error):
            raise r
        r["rtt_ms"] = (time.perf_counter() - t) * 1000
        return r

    def ping_each(self, timeout_ms: int | None = None) -> dict[int, dict[str, Any] | None]:
        """Every reader's health by index, None for a reader that does not answer in time."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        ctx = self._context()
        out: dict[int, dict[str, Any] | None] = {}
        socks = []
        try:
            for i, ep in enumerate(self.endpoints):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                socks.append(s)
                security.secure_client(s, self.config, ep)
                s.connect(ep)
                s.send(PING.frame(None, i + 1))
            deadline = time.monotonic() + timeout / 1000
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            while len(out) < len(socks) and (left := deadline - time.monotonic()) > 0:
                for s, _ in poller.poll(int(left * 1000) + 1):
                    i = socks.index(s)
                    try:
                        seq, status, body = protocol.unpack_frame(s.recv())
                    except Error:
                        continue
                    out[i] = body if status == 0 and seq == i + 1 else None
                    poller.unregister(s)
        finally:
            for s in socks:
                s.close(linger=0)
        return {i: out.get(i) for i in range(len(self.endpoints))}

    def _frame(self, conn: _PoolConn, code: int, body: Any, map_version: int = 0
               ) -> tuple[int, bytes]:
        conn.seq += 1
        frame = protocol.pack_request(code, None, conn.seq, body, 0, map_version)
        if len(frame) > protocol.MAX_FRAME_SIZE:
            raise LimitExceeded(
                f"request of {len(frame):,} bytes is over the frame limit of "
                f"{protocol.MAX_FRAME_SIZE:,} bytes", hint="ask for fewer keys at once")
        return conn.seq, frame

    def _exchange(self, conn: _PoolConn, frames: list[tuple[int, bytes]],
                  parts: Sequence[tuple[int, int, Any]] | None,
                  attempts: int | None = None) -> list[Any]:
        """Send the frames, wait for a reply to each; Lazy Pirate on timeout."""
        m = len(self.endpoints)
        index = {seq: n for n, (seq, _) in enumerate(frames)}
        target = {seq: (conn.home + n) % m for n, (seq, _) in enumerate(frames)}
        results: list[Any] = [None] * len(frames)
        pending = set(index)
        attempts = self.retries + 1 if attempts is None else attempts
        for attempt in range(attempts):
            deadline = time.monotonic() + self.timeout_ms / 1000
            sent = self._send_pending(conn, frames, pending, target, deadline)
            first = frames[0][0]
            if first in sent:
                conn.home = sent[first]
            socks = {self._sock(conn, j) for j in sent.values()}
            if socks:
                self._receive(socks, pending, index, results, deadline)
            else:  # no reader is connected: give them the rest of the timeout to come up
                time.sleep(max(0.0, deadline - time.monotonic()))
            if not pending:
                return results
            self.counters["timeouts"] += len(pending)
            if attempt < attempts - 1:
                self.counters["retries"] += len(pending)
                log.info("the reader pool did not answer %d request(s) in %d ms: resending to "
                         "the next reader", len(pending), self.timeout_ms)
            for seq in pending:  # a fresh socket: no late reply is read as an answer
                if seq in sent:
                    self._drop(conn, sent[seq])
                target[seq] = (target[seq] + 1) % m
            conn.home = target[first] if first in pending else conn.home
        raise self._unavailable(parts)

    def _send_pending(self, conn: _PoolConn, frames: list[tuple[int, bytes]],
                      pending: set[int], target: dict[int, int], deadline: float
                      ) -> dict[int, int]:
        """Send each pending frame to its target reader (or the next connected one, which
        becomes its target); seq -> the reader it went to."""
        sent: dict[int, int] = {}
        for seq, frame in frames:
            if seq in pending:
                j = self._send(conn, target[seq], frame, deadline)
                if j is not None:
                    sent[seq] = target[seq] = j
        return sent

    def _unavailable(self, parts: Sequence[tuple[int, int, Any]] | None) -> ShardUnavailable:
        what = "ping" if parts is None else f"shards {sorted({p[0] for p in parts})}"
        eps = self.endpoints
        where = eps[0] if len(eps) == 1 else f"{eps[0]} .. {eps[-1]} ({len(eps)} readers)"
        return ShardUnavailable(
            f"the reader pool at {where} did not answer ({what}) within {self.timeout_ms} ms, "
            f"{self.retries + 1} attempts" + security.auth_hint(self.config, eps[0]),
            hint="check that the readers run (lmshard status; lmshard ctl status) and their logs",
        )

    @staticmethod
    def _accept(data: bytes, pending: set[int], index: dict[int, int], results: list[Any]
                ) -> None:
        try:
            seq, status, body = protocol.unpack_frame(data)
            if seq not in pending:
                return  # a late answer to an earlier attempt
            results[index[seq]] = body if status == 0 else error_from_wire(status, *body)
        except Exception:
            log.warning("the reader pool sent an undecodable reply: dropped")
            return
        pending.discard(seq)

    def _receive(self, socks: set[Any], pending: set[int], index: dict[int, int],
                      results: list[Any], deadline: float) -> None:
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for sock, _ in poller.poll(max(1, int(left * 1000))):
                while True:
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._accept(data, pending, index, results)

    # -- paged scans -------------------------------------------------------------------------

    def scan(self, shard: int, table_id: bytes, lo: bytes | None = None,
             hi: bytes | None = None, reverse: bool = False, page: int = SCAN_PAGE,
             *, map_version: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """Encoded (key, value) pairs of one shard with ``lo <= key < hi``, fetched a page at
        a time. Each page is its own snapshot: rows written between pages may or may not
        show up, rows are never repeated or skipped out of key order."""
        return paged_scan(lambda body: self.request(shard, SCAN.code, body,
                                                    map_version=map_version),
                          table_id, lo, hi, reverse, page)

    # -- lifetime ----------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's context and sockets; new ones on use."""
        self._ctx = None
        self._tls = threading.local()

    def close(self) -> None:
        self._closed = True
        self._tls = threading.local()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
