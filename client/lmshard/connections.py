"""A client's connections to the shard owners and the requests over them (Lazy Pirate).

Each thread has its own DEALER socket per shard owner (a ZeroMQ socket must stay in one
thread), with its own sequence numbers, and one client id that tags its writes. A request that
has no reply within ``timeout_ms`` is resent on a fresh socket with the same sequence number
(the ZeroMQ guide's Lazy Pirate); the owner applies a write once per (client id, sequence
number), so the retry is safe. After ``retries`` the request fails with ShardUnavailable.

When an owner's endpoint is ipc and no reply came after PROBE_MS, the owner's socket file is
looked for: a missing file while no supervisord of the service runs means the service is down,
and the request fails at once instead of after every retry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import zmq

from lmshard import security
from lmshard.client_counters import ClientCounters
from lmshard.config import SUPERVISOR_SOCKET, Config
from lmshard.errors import ShardUnavailable, TransactionError, error_from_wire
from lmshard.protocol import ZERO_COPY_MIN, pack_request, unpack_frame

log = logging.getLogger("lmshard.client")

PROBE_MS = 50
"""A request to an ipc endpoint that has no reply after this long checks that the owner's
socket file exists; a missing file fails the request at once (ShardUnavailable) instead of
after timeout_ms x (retries + 1). Replies faster than this cost no check."""
PROBE_RECHECK_S = 0.01
"""A socket file found missing by that check is looked for once more after this long."""

_SILENT = object()
"""What an attempt returns when no reply came in time."""


def _file_missing(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # e.g. no permission to look: let the request find out
    return False


class _Conn:
    """One thread's DEALER socket to one shard owner, with its own sequence numbers."""

    __slots__ = ("sock", "seq", "gone")

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.seq = 0
        self.gone = False
        """The owner's socket file was missing when the last request failed: the next request
        checks for it before sending anything."""


class OwnerConnections:
    """The sockets of one client to every shard owner, per thread, and requests over them."""

    def __init__(self, config: Config, counters: ClientCounters, *, timeout_ms: int,
                 retries: int) -> None:
        self.config = config
        self.counters = counters
        self.timeout_ms = timeout_ms
        self.retries = retries
        self._ipc_paths: list[str | None] = [
            ep[len("ipc://"):] if ep.startswith("ipc:///") else None
            for ep in map(config.endpoint, range(config.shards))]
        """Per shard, the owner's socket file when its endpoint is ipc, else None."""
        self._supervisor_socket = os.fspath(config.run_dir / SUPERVISOR_SOCKET)
        self._ctx: zmq.Context[Any] | None = None
        self._tls = threading.local()
        self._closed = False

    # -- sockets -----------------------------------------------------------------------------

    def endpoint(self, shard: int) -> str:
        return self.config.endpoint(shard)

    def socket(self, shard: int) -> zmq.Socket[bytes]:
        """A new DEALER socket connected to the shard's owner (a pipelined stream's own)."""
        if self._closed:
            raise TransactionError("this client is closed", hint="connect again")
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        endpoint = self.config.endpoint(shard)
        security.secure_client(sock, self.config, endpoint)
        sock.connect(endpoint)
        return sock

    @property
    def client_id(self) -> bytes:
        """This thread's client id: the owners record the last sequence number applied per id."""
        self._conns()
        cid: bytes = self._tls.client_id
        return cid

    def _conns(self) -> dict[int, _Conn]:
        conns: dict[int, _Conn] | None = getattr(self._tls, "conns", None)
        if conns is None:
            conns = self._tls.conns = {}
            self._tls.client_id = uuid.uuid4().bytes
        return conns

    def _conn(self, shard: int) -> _Conn:
        conns = self._conns()
        conn = conns.get(shard)
        if conn is None:
            conn = conns[shard] = _Conn(self.socket(shard))
        return conn

    def _reconnect(self, shard: int, conn: _Conn) -> None:
        conn.sock.close(linger=0)
        conn.sock = self.socket(shard)

    # -- one request -------------------------------------------------------------------------

    def request(self, shard: int, code: int, body: Any, *, write: bool) -> Any:
        """Send one request to one shard and wait for its reply body (or the Error the owner
        answered with), with Lazy Pirate retries; ShardUnavailable when it stays silent.

        The one-shard case of ``requests``, kept lean: it is every single put's path. The
        wait is a blocking recv under RCVTIMEO (one poll inside libzmq); ``Socket.poll`` would
        build a Poller and poll the socket several times per reply.
        """
        conn = self._conn(shard)
        if conn.gone:  # the owner was not there last time: fail before sending if it still is not
            if self._socket_missing(shard):
                raise self._gone(shard)
            conn.gone = False
        conn.seq += 1
        seq = conn.seq
        frame = pack_request(code, self._tls.client_id if write else None, seq, body)
        for attempt in range(self.retries + 1):
            reply = self._attempt(shard, conn, seq, frame)
            if reply is not _SILENT:
                return reply
            self._note_silence(attempt, [(shard, seq)])
            self._reconnect(shard, conn)
        raise self._unavailable(shard)

    def _attempt(self, shard: int, conn: _Conn, seq: int, frame: bytes) -> Any:
        """Send ``frame`` once and wait up to timeout_ms for its reply; _SILENT if none."""
        sock = conn.sock
        try:
            sock.send(frame, zmq.NOBLOCK, len(frame) < ZERO_COPY_MIN)
        except zmq.Again:
            pass  # the queue to that peer is full: wait out the timeout, then retry
        wait_ms = self.timeout_ms
        deadline = time.monotonic() + wait_ms / 1000
        probe = self._ipc_paths[shard] is not None
        while wait_ms > 0:
            # A first short wait, then (ipc) a look for the owner's socket file: a reply in
            # time costs nothing more than before.
            first = PROBE_MS if probe and wait_ms > PROBE_MS else wait_ms
            sock.setsockopt(zmq.RCVTIMEO, first)
            try:
                reply = sock.recv()
            except zmq.Again:
                if first == wait_ms:
                    break
                probe = False
                if self._socket_missing(shard, recheck=True):
                    conn.gone = True
                    self._reconnect(shard, conn)  # drops the queued request: none applies
                    raise self._gone(shard) from None
                wait_ms = int((deadline - time.monotonic()) * 1000)
                continue
            rseq, status, rbody = unpack_frame(reply)
            if rseq == seq:
                return rbody if status == 0 else error_from_wire(status, *rbody)
            wait_ms = int((deadline - time.monotonic()) * 1000)  # a late, stale reply
        return _SILENT

    def _note_silence(self, attempt: int, silent: list[tuple[int, int]]) -> None:
        """Count the requests (shard, seq) left unanswered by an attempt; log a retry."""
        counters = self.counters.mine()
        counters["timeouts"] += len(silent)
        if attempt < self.retries:
            counters["retries"] += len(silent)
            for shard, seq in silent:
                log.info("shard %d did not answer in %d ms: reconnecting, resending "
                         "sequence %d", shard, self.timeout_ms, seq)

    # -- requests to several shards at once --------------------------------------------------

    def requests(self, parts: dict[int, tuple[int, Any]], *, write: bool,
                 silent_ok: bool = False) -> dict[int, Any]:
        """Send requests ``shard -> (code, body)`` to several shards at once, wait for every
        reply.

        Returns shard -> reply body, or shard -> Error for a shard that answered with an
        error; a shard that stays silent through every retry raises ShardUnavailable (or,
        with ``silent_ok``, gets a ShardUnavailable as its result).
        """
        conns = {s: self._conn(s) for s in parts}
        gone = {s for s in parts if conns[s].gone and self._still_gone(s, conns[s])}
        cid = self._tls.client_id if write else None
        frames: dict[int, bytes] = {}
        seqs: dict[int, int] = {}
        for s, (code, body) in parts.items():
            conn = conns[s]
            conn.seq += 1
            seqs[s] = conn.seq
            frames[s] = pack_request(code, cid, conn.seq, body)
        results: dict[int, Any] = {}
        pending = set(parts) - gone
        for attempt in range(self.retries + 1):
            if not pending:
                break
            for s in pending:
                try:
                    conns[s].sock.send(frames[s], zmq.NOBLOCK, len(frames[s]) < ZERO_COPY_MIN)
                except zmq.Again:
                    pass  # the queue to that peer is full: wait out the timeout, then retry
            self._collect(conns, seqs, pending, gone, results)
            if not pending:
                break
            self._note_silence(attempt, [(s, seqs[s]) for s in sorted(pending)])
            if attempt < self.retries:
                for s in pending:
                    self._reconnect(s, conns[s])
        return self._outcome(conns, results, pending, gone, silent_ok)

    def _still_gone(self, shard: int, conn: _Conn) -> bool:
        """For an owner that was not there last time: True if it still is not (nothing is
        sent to it), else forget that it was gone."""
        if self._socket_missing(shard):
            return True
        conn.gone = False
        return False

    def _collect(self, conns: dict[int, _Conn], seqs: dict[int, int], pending: set[int],
                 gone: set[int], results: dict[int, Any]) -> None:
        """Wait up to timeout_ms for the replies of the ``pending`` shards; after a short
        wait, look for the socket file of each ipc owner still silent."""
        now = time.monotonic()
        deadline = now + self.timeout_ms / 1000
        probe_at = (now + PROBE_MS / 1000
                    if any(self._ipc_paths[s] is not None for s in pending) else None)
        poller = zmq.Poller()
        by_sock = {}
        for s in pending:
            poller.register(conns[s].sock, zmq.POLLIN)
            by_sock[conns[s].sock] = s
        while pending:
            now = time.monotonic()
            if probe_at is not None and now >= probe_at:
                probe_at = None
                self._drop_gone(conns, pending, gone, poller)
                continue
            left = (deadline if probe_at is None else min(deadline, probe_at)) - now
            if left <= 0:
                return
            for sock, _ in poller.poll(max(1, int(left * 1000))):
                s = by_sock[sock]
                seq, status, body = unpack_frame(sock.recv())
                if seq != seqs[s] or s not in pending:
                    continue  # a late answer to an earlier attempt
                results[s] = body if status == 0 else error_from_wire(status, *body)
                pending.discard(s)
                poller.unregister(sock)

    def _drop_gone(self, conns: dict[int, _Conn], pending: set[int], gone: set[int],
                   poller: zmq.Poller) -> None:
        """Move the pending shards whose socket file is missing to ``gone``."""
        for s in sorted(pending):
            if self._socket_missing(s, recheck=True):
                pending.discard(s)
                gone.add(s)
                conns[s].gone = True
                poller.unregister(conns[s].sock)
                self._reconnect(s, conns[s])  # drops the queued request

    def _outcome(self, conns: dict[int, _Conn], results: dict[int, Any], pending: set[int],
                 gone: set[int], silent_ok: bool) -> dict[int, Any]:
        if not pending and not gone:
            return results
        for p in pending:  # a fresh socket next time: no stale reply may be read as ours
            self._reconnect(p, conns[p])
        if silent_ok:
            results.update((g, self._gone(g)) for g in gone)
            results.update((p, self._unavailable(p)) for p in pending)
            return results
        first = min(gone | pending)
        raise self._gone(first) if first in gone else self._unavailable(first)

    # -- an owner that is not there ----------------------------------------------------------

    def _socket_missing(self, shard: int, *, recheck: bool = False) -> bool:
        """True when the shard's endpoint is ipc, its socket file does not exist and no
        supervisord of this service runs: the service is down. (A stopped owner removes the
        file; a crashed one leaves it, and the request keeps its retries, as supervisord
        restarts a crashed owner; while supervisord runs, a missing file may be an owner it
        is restarting, so the request keeps its retries too.) ``recheck``: look twice,
        PROBE_RECHECK_S apart, as an owner starting over a crashed one's file removes that
        file just before it binds its own."""
        path = self._ipc_paths[shard]
        if path is None or not _file_missing(path):
            return False
        if recheck:
            time.sleep(PROBE_RECHECK_S)
            if not _file_missing(path):
                return False
        return _file_missing(self._supervisor_socket)

    def _gone(self, shard: int) -> ShardUnavailable:
        self.counters.mine()["unavailable"] += 1
        return ShardUnavailable(
            f"shard {shard} at {self.config.endpoint(shard)} is not running: its socket file "
            f"{self._ipc_paths[shard]} does not exist (failed at once, not after "
            f"{self.timeout_ms} ms x {self.retries + 1} attempts)",
            hint="start the service with `lmshard up`; `lmshard status` shows which shard "
                 "owners run",
        )

    def _unavailable(self, shard: int) -> ShardUnavailable:
        self.counters.mine()["unavailable"] += 1
        return ShardUnavailable(
            f"shard {shard} at {self.config.endpoint(shard)} did not answer within "
            f"{self.timeout_ms} ms, {self.retries + 1} attempts"
            + security.auth_hint(self.config, self.config.endpoint(shard)),
            hint="check that the shard owner runs: lmshard status; its log names the cause",
        )

    # -- lifetime ----------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """Forget the parent's context and sockets: they must not cross fork()."""
        self._ctx = None
        self._tls = threading.local()

    def close(self) -> None:
        """Close this thread's sockets and the context (sockets of other threads with it)."""
        self._closed = True
        conns = getattr(self._tls, "conns", None) or {}
        for conn in conns.values():
            conn.sock.close(linger=0)
        self._tls = threading.local()
        if self._ctx is not None:
            self._ctx.term() if not conns else self._ctx.destroy(linger=0)
            self._ctx = None
