"""A client's connections to the shard owners and the requests over them (Lazy Pirate).

Each thread has its own DEALER socket per shard owner (a ZeroMQ socket must stay in one
thread), with its own sequence numbers, and one client id that tags its writes. A request that
has no reply within ``timeout_ms`` is resent on a fresh socket with the same sequence number
(the ZeroMQ guide's Lazy Pirate); the owner applies a write once per (client id, sequence
number), so the retry is safe. After ``retries`` the request fails with ShardUnavailable.

When an owner's endpoint is ipc and no reply came after PROBE_MS, the owner's socket file is
looked for: a missing file means the owner is not running (unless supervisord says it is being
started: a restart), and the request fails at once instead of after every retry.

Two more bounds keep a web request from waiting on a shard it cannot have: a deadline per call
(``Client.deadline``, per thread), past which a call fails with DeadlineExceeded whatever its
retries had left; and a circuit breaker per shard: once a shard failed to answer a request through
every retry, calls to it fail at once for ``breaker_ms``, then one call goes through as a probe.

Following a failover (``ShardCopies``). A shard has copies: its home and, with ``replica.names``,
one per replica; one of them is the primary. Each shard's requests go to the copy the client
believes is primary (home at first) and carry the highest epoch of the shard the client has seen.
A ``NotPrimary`` answer naming the primary moves the shard's requests to that copy; one that
names none, or a request the current copy left unanswered through every retry, makes the client
ping every copy of the shard and move to the primary with the highest epoch. Either way the same
request (same client id and sequence number) is sent to the new copy, which holds the replicated
client records, so a write the old copy applied is answered from its record, not applied again.

Same-host owners (``lmshard.unix_wire``). With ``shard.unix_socket`` on and an ipc endpoint, each
thread's connection to an owner also has a plain unix stream connection to the owner's unix
socket (``lmshard.unix_client``), and ``request`` sends its frame there when it is no longer than
CLIENT_MAX_FRAME: the same frame, sequence number and waits as over the DEALER, without ZeroMQ's
thread hand-offs. When that connection breaks (the owner stopped, was killed or restarted) the
same frame goes over the DEALER within the same attempt (the owner applies a write once per
client id and sequence number, so a frame that may have reached it can be sent again); a new
unix connection is tried with the next fresh socket, or by a request at most once a
UNIX_RETRY_S. Requests to several shards at once and the pipelined writer stay on ZeroMQ (the
async client has its own unix connections: ``lmshard.aio_owners``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import zmq

from lmshard import security
from lmshard.client_counters import ClientCounters
from lmshard.config import SUPERVISOR_SOCKET, Config, owner_program
from lmshard.contexts import OwnedContext
from lmshard.copies import file_missing, highest_epoch, owner_socket, ping_copies, primary_of
from lmshard.errors import (
    DeadlineExceeded,
    Error,
    NotPrimary,
    ShardUnavailable,
    SlotsMoving,
    TransactionError,
    error_from_wire,
)
from lmshard.members import FIRST_EPOCH, HOME
from lmshard.protocol import ZERO_COPY_MIN, pack_request, unpack_frame
from lmshard.slot_routes import moving_waits
from lmshard.unix_client import StreamBroken, UnixStream
from lmshard.unix_wire import CLIENT_MAX_FRAME, unix_path

log = logging.getLogger("lmshard.client")

PROBE_MS = 50
"""A request to an ipc endpoint that has no reply after this long checks that the owner's
socket file exists; a missing file fails the request at once (ShardUnavailable) instead of
after timeout_ms x (retries + 1). Replies faster than this cost no check."""
PROBE_RECHECK_S = 0.01
"""A socket file found missing by that check is looked for once more after this long."""
STOPPED_RECHECK_S = 0.2
"""An owner supervisord reports stopped is asked about once more after this long (``ctl
restart`` stops it, then starts it)."""
STOPPED_STATES = frozenset({"STOPPED", "EXITED", "FATAL"})
BREAKER_MIN_WAIT = 0.1
"""A call whose deadline passed after it had waited this long (seconds) for a silent owner
opens the shard's breaker too: a deadline shorter than the retries must not let every call
wait it out."""
"""supervisord states of a program that is not running and not about to."""
UNIX_RETRY_S = 1.0
"""A connection whose owner's unix socket did not take a connection, or whose unix connection
broke, tries again on a request at most this often (seconds): an owner restarted with the
socket is found again; until then requests go over the DEALER."""
SEARCH_MS = 500
"""Longest wait for the copies of a shard to answer the ping that looks for its primary (less
when timeout_ms or the call's deadline is shorter)."""

_SILENT = object()
"""What an attempt returns when no reply came in time."""
_GONE = object()
"""What an attempt returns when the owner's socket file is missing (the owner is not running)."""
_MOVED = object()
"""What an exchange returns when, after a timeout, the shard moved to another copy."""


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc:///") else None


def _supervisor_state(socket_path: str, shard: int) -> str | None:
    """The state supervisord (on its unix socket) reports for shard ``shard``'s owner, e.g.
    "RUNNING" or "STOPPED"; None when it cannot tell."""
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    try:
        proxy: Any = xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{socket_path}"))
        info = proxy.supervisor.getProcessInfo(owner_program(shard))
        return str(info["statename"])
    except (OSError, xmlrpc.client.Error, KeyError, TypeError):
        return None


def write_wait_ms(config: Config, timeout_ms: int) -> int:
    """How long a write waits for its ack before it is resent: ``timeout_ms``, plus
    ``durability.replica_timeout`` when acks wait for replicas (the owner answers a write its
    replicas did not confirm only once that has passed, with ReplicaTimeout)."""
    if not config.replicas_required:
        return timeout_ms
    return timeout_ms + math.ceil(config.replica_timeout * 1000)


def silent_owner(config: Config, shard: int, timeout_ms: int, retries: int,
                 endpoint: str | None = None) -> ShardUnavailable:
    """The error of a request shard ``shard``'s owner (at ``endpoint``, default its home's) left
    unanswered through every retry."""
    endpoint = endpoint or config.endpoint(shard)
    return ShardUnavailable(
        f"shard {shard} at {endpoint} did not answer within {timeout_ms} ms, "
        f"{retries + 1} attempts" + security.auth_hint(config, endpoint),
        hint="check that the shard owner runs: lmshard status; its log names the cause",
    )


def breaker_open(config: Config, shard: int, left_s: float, why: str,
                 endpoint: str | None = None) -> ShardUnavailable:
    """The error of a call to shard ``shard`` while its breaker is open for ``left_s`` more
    seconds; ``why`` says what opened it."""
    return ShardUnavailable(
        f"shard {shard} at {endpoint or config.endpoint(shard)} left a recent request "
        f"unanswered {why}: "
        f"calls to it fail at once for {left_s * 1000:.0f} ms more (client.breaker_ms), then "
        "one goes through to see whether it is back",
        hint="check that the shard owner runs: lmshard status; calls to other shards are not "
             "affected")


class ShardCopies:
    """Per shard: the copy a client believes is primary (its name and request endpoint) and the
    highest epoch of the shard seen, from acks, NotPrimary answers and pings."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.names: list[str] = [HOME] * config.shards
        """The copy each shard's requests go to."""
        self.endpoints: list[str] = [config.endpoint(s) for s in range(config.shards)]
        """That copy's request endpoint."""
        self.epochs: list[int] = [0] * config.shards
        """The highest epoch seen per shard (0: none yet); requests carry it."""
        self.replicated = bool(config.replica_names)
        """Whether the shards have copies to move to."""

    def grow(self, config: Config) -> None:
        """Take the shards ``config`` has beyond these (a re-shard added them)."""
        for s in range(len(self.names), config.shards):
            self.names.append(HOME)
            self.endpoints.append(config.endpoint(s))
            self.epochs.append(0)
        self.config = config

    def saw_epoch(self, shard: int, epoch: Any) -> None:
        if type(epoch) is int and epoch > self.epochs[shard]:
            self.epochs[shard] = epoch

    def ack_epoch(self, shard: int, body: Any) -> int:
        """The epoch of a write's ack ``[txn id, results, epoch]`` (noted as seen); an ack of
        an owner that sends none belongs to the highest epoch seen (the first if none)."""
        if len(body) > 2:
            self.saw_epoch(shard, body[2])
        return self.epochs[shard] or FIRST_EPOCH

    def move(self, shard: int, name: str) -> None:
        """Send shard ``shard``'s requests to copy ``name`` from now on."""
        endpoint = self.config.member(shard, name).endpoint
        log.warning("shard %d: copy %r at %s is its primary now (epoch %d); requests go there",
                    shard, name, endpoint, self.epochs[shard])
        self.names[shard] = name
        self.endpoints[shard] = endpoint

    def target(self, shard: int, answer: NotPrimary | None, ctx: zmq.Context[Any],
               wait_ms: int) -> str | None:
        """Where shard ``shard``'s requests should go after ``answer`` (a NotPrimary, or None:
        the current copy did not answer): the copy it names, else the primary found by pinging
        every copy for up to ``wait_ms``; None when that is the current copy or none is found."""
        if not self.replicated:
            return None
        name: str | None = None
        if answer is not None:
            self.saw_epoch(shard, answer.epoch)
            if answer.primary in (HOME, *self.config.replica_names):
                name = answer.primary
        if name is None and wait_ms > 0:
            answers = ping_copies(self.config, shard, timeout=wait_ms / 1000, ctx=ctx)
            self.saw_epoch(shard, highest_epoch(answers))
            best = primary_of(answers)
            name = None if best is None else best.member
        return None if name == self.names[shard] else name


class OwnerSockets:
    """New sockets to the owners, from one context per client (the sync and the async client's
    connections; also what a writer's streams ask for)."""

    config: Config
    copies: ShardCopies
    on_ack: Callable[[int, str, int, int], None] | None
    """Told of every write's ack: (shard, the copy that acked, its epoch, its txn id)."""
    timeout_ms: int
    write_timeout_ms: int
    retries: int
    _ctx: zmq.Context[Any] | None
    _closed: bool

    def moving_limit_s(self, write: bool) -> float:
        """How long a request answered SlotsMoving is sent again before the caller gets it:
        as long as the retries would wait for a silent owner."""
        return (self.write_timeout_ms if write else self.timeout_ms) * (self.retries + 1) / 1000

    def endpoint(self, shard: int) -> str:
        """The request endpoint of the copy the shard's requests go to."""
        return self.copies.endpoints[shard]

    def epoch(self, shard: int) -> int:
        """The highest epoch of the shard seen, which requests carry (0: none yet)."""
        return self.copies.epochs[shard]

    def context(self) -> zmq.Context[Any]:
        if self._closed:
            raise TransactionError("this client is closed", hint="connect again")
        if self._ctx is None:
            self._ctx = OwnedContext()  # a client dropped unclosed must not hang the GC
        return self._ctx

    def socket(self, shard: int) -> zmq.Socket[bytes]:
        """A new DEALER socket connected to the shard's current copy (a writer stream's own)."""
        return owner_socket(self.context(), self.config, self.copies.endpoints[shard])

    def note_ack(self, shard: int, body: Any) -> None:
        """Note a write's ack ``[txn id, results(, epoch)]``: its epoch, and tell ``on_ack``."""
        epoch = self.copies.ack_epoch(shard, body)
        if self.on_ack is not None:
            self.on_ack(shard, self.copies.names[shard], epoch, body[0])

    def follow(self, shard: int, answer: NotPrimary | None) -> bool:
        """After ``answer`` from the shard's copy (None: it stayed silent), move the shard's
        requests to the copy that is primary now, if another one is; whether they moved.
        (This transport does not follow: False.)"""
        return False

    def grow(self, config: Config) -> None:
        """Connect to the shards ``config`` has beyond the current one's (a re-shard added
        them: ``lmshard.slot_routes.grown_config``)."""
        self.copies.grow(config)
        self._grow_arrays(config)
        self.config = config

    def _grow_arrays(self, config: Config) -> None:
        """Grow the transport's own per-shard arrays to ``config.shards``."""


class _Conn:
    """One thread's DEALER socket to one shard owner, with its own sequence numbers, and its
    unix connection to the owner when it has one."""

    __slots__ = ("sock", "endpoint", "seq", "gone", "unix", "unix_path", "unix_retry_at")

    def __init__(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        self.sock = sock
        self.endpoint = endpoint
        """The copy's endpoint the socket is connected to."""
        self.seq = 0
        self.gone = False
        """The owner's socket file was missing when the last request failed: the next request
        checks for it before sending anything."""
        self.unix: UnixStream | None = None
        """The unix connection to that copy's owner, if one is open."""
        self.unix_path: str | None = None
        """That owner's unix socket (None: ZeroMQ only, by config or endpoint)."""
        self.unix_retry_at = 0.0
        """When (monotonic) a request may next try to open the unix connection."""


class OwnerConnections(OwnerSockets):
    """The sockets of one client to every shard owner, per thread, and requests over them."""

    def __init__(self, config: Config, counters: ClientCounters, *, timeout_ms: int,
                 retries: int, breaker_ms: int = 0) -> None:
        self.config = config
        self.counters = counters
        self.timeout_ms = timeout_ms
        self.write_timeout_ms = write_wait_ms(config, timeout_ms)
        self.retries = retries
        self.breaker_ms = breaker_ms
        self.copies = ShardCopies(config)
        self.on_ack = None
        self._open_until = [0.0] * config.shards
        """Per shard: until when (monotonic) calls fail at once; 0.0 while the shard answers."""
        self._deadlines = threading.local()
        self._stopped_seen: dict[int, tuple[float, bool]] = {}
        self._ipc_paths: list[str | None] = [
            _ipc_path(ep) for ep in map(config.endpoint, range(config.shards))]
        """Per shard, the owner's socket file when its endpoint is ipc, else None."""
        self._supervisor_socket = os.fspath(config.run_dir / SUPERVISOR_SOCKET)
        self._ctx: zmq.Context[Any] | None = None
        self._tls = threading.local()
        self._streams: weakref.WeakSet[UnixStream] = weakref.WeakSet()
        """Every thread's unix connections (``close`` ends them all), in process _streams_pid."""
        self._streams_pid = os.getpid()
        self._streams_lock = threading.Lock()
        self._closed = False

    def _grow_arrays(self, config: Config) -> None:
        for s in range(len(self._open_until), config.shards):
            self._open_until.append(0.0)
            self._ipc_paths.append(_ipc_path(config.endpoint(s)))

    # -- sockets -----------------------------------------------------------------------------

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
            conn = conns[shard] = _Conn(self.socket(shard), self.copies.endpoints[shard])
            self._unix_to(conn)
        elif conn.endpoint is not self.copies.endpoints[shard]:
            self._reconnect(shard, conn)  # another thread moved the shard to another copy
            conn.gone = False
        return conn

    def _reconnect(self, shard: int, conn: _Conn) -> None:
        conn.sock.close(linger=0)
        conn.endpoint = self.copies.endpoints[shard]
        conn.sock = self.socket(shard)
        if conn.unix is not None:
            conn.unix.close()
        self._unix_to(conn)

    def _unix_to(self, conn: _Conn) -> UnixStream | None:
        """Open ``conn``'s unix connection to the owner at its endpoint, if the config allows
        and the endpoint is ipc; None when there is none (then requests go over the DEALER,
        and one tries again after UNIX_RETRY_S)."""
        path = conn.unix_path = (unix_path(conn.endpoint) if self.config.unix_socket
                                 else None)
        conn.unix = None
        if path is None:
            return None
        stream = UnixStream.connect(path)
        if stream is None:
            conn.unix_retry_at = time.monotonic() + UNIX_RETRY_S
            return None
        with self._streams_lock:
            self._streams.add(stream)
        conn.unix = stream
        return stream

    # -- one request -------------------------------------------------------------------------

    def request(self, shard: int, code: int, body: Any, *, write: bool,
                map_version: int = 0) -> Any:
        """Send one request to one shard and wait for its reply body (or the Error the owner
        answered with), with Lazy Pirate retries; ShardUnavailable when it stays silent.
        ``map_version``: the version of the slot map the request was routed by; a write the
        owner answers SlotsMoving is sent again (``_moving``) until it is not, or its time
        is up.

        The one-shard case of ``requests``, kept lean: it is every single put's path. The
        wait is a blocking recv under RCVTIMEO (one poll inside libzmq); ``Socket.poll`` would
        build a Poller and poll the socket several times per reply.
        """
        conn = self._conn(shard)
        if conn.gone or self._open_until[shard]:
            self._may_send(shard, conn)
        until = getattr(self._deadlines, "at", None)
        conn.seq += 1
        seq = conn.seq
        cid = self._tls.client_id if write else None
        moves = 0
        waits = None
        while True:
            frame = pack_request(code, cid, seq, body, self.copies.epochs[shard], map_version)
            reply = self._exchange(shard, conn, seq, frame, until, write,
                                   search=moves <= len(self.config.replica_names))
            if type(reply) is SlotsMoving:
                waits = waits or self._moving_waits(until, write)
                if next(waits):
                    continue  # the same request, same sequence number, once the move is done
            if reply is _MOVED or self._moved_copy(shard, conn, reply, moves):
                moves += 1
                continue  # the same request, same sequence number, to the new copy
            if reply is _SILENT:
                raise self._trip(shard)
            if reply is _GONE:
                raise self._gone(shard)
            if write and not isinstance(reply, Error):
                self.note_ack(shard, reply)
            return reply

    def _moved_copy(self, shard: int, conn: _Conn, reply: Any, moves: int) -> bool:
        """Whether, after ``reply`` (silence, a missing owner, NotPrimary), the shard moved to
        another copy (``_follow``), which the request goes to next."""
        if reply is _SILENT or reply is _GONE or isinstance(reply, NotPrimary):
            answer = reply if isinstance(reply, NotPrimary) else None
            return moves <= len(self.config.replica_names) and self._follow(shard, conn, answer)
        return False

    def _moving_waits(self, until: float | None, write: bool) -> Any:
        """Yields, before each resend of a request answered SlotsMoving, True after waiting
        (``slot_routes.moving_waits``), or False when the call's time is up: its deadline, or
        as long as its retries would have waited for a silent owner."""
        give_up = time.monotonic() + self.moving_limit_s(write)
        if until is not None:
            give_up = min(give_up, until)
        for wait in moving_waits():
            left = give_up - time.monotonic()
            if left <= 0:
                yield False
                return
            time.sleep(min(wait, left))
            yield True

    def _exchange(self, shard: int, conn: _Conn, seq: int, frame: bytes, until: float | None,
                  write: bool, search: bool = False) -> Any:
        """Send ``frame`` and wait for its reply, resending it on a fresh socket after each
        timeout; the reply, or _SILENT after every retry, or _GONE when the owner is not
        running. With ``search`` and replicas, a timeout first asks the copies whether another
        owns the shard now: then the shard moves there and the answer is _MOVED (a failover
        is found after one timeout, not after every retry)."""
        sent_at = time.monotonic()
        for attempt in range(self.retries + 1):
            wait_ms = self.write_timeout_ms if write else self.timeout_ms
            if until is not None:
                wait_ms = min(wait_ms, math.ceil((until - time.monotonic()) * 1000))
                if wait_ms <= 0:  # (a resend's socket is fresh: no late reply is read)
                    if attempt > 0:
                        self._trip_after_wait(shard, sent_at)
                    raise self._past_deadline(shard, sent=attempt > 0, write=write)
            reply = self._attempt(shard, conn, seq, frame, wait_ms)
            if reply is _GONE:
                return reply
            if reply is not _SILENT:
                if self._open_until[shard]:
                    self._open_until[shard] = 0.0  # the probe got through
                return reply
            self._note_silence(attempt, [(shard, seq)])
            if search and self.copies.replicated and self._follow(shard, conn, None):
                return _MOVED
            self._reconnect(shard, conn)
        return _SILENT

    def follow(self, shard: int, answer: NotPrimary | None) -> bool:
        """After ``answer`` from the shard's copy (None: it stayed silent, or is not running),
        move the shard's requests to the copy that is primary now, if another one is
        (``ShardCopies.target``; the search keeps this thread's deadline); whether they moved.
        The breaker, which was the old copy's, is closed."""
        wait_ms = min(self.timeout_ms, SEARCH_MS)
        until = getattr(self._deadlines, "at", None)
        if until is not None:
            wait_ms = min(wait_ms, int((until - time.monotonic()) * 1000))
        name = self.copies.target(shard, answer, self.context(), wait_ms)
        if name is None:
            return False
        self.copies.move(shard, name)
        self._ipc_paths[shard] = _ipc_path(self.copies.endpoints[shard])
        self._open_until[shard] = 0.0
        self._stopped_seen.pop(shard, None)
        return True

    def _follow(self, shard: int, conn: _Conn, answer: NotPrimary | None) -> bool:
        """``follow``, and this thread's socket to the shard reconnected to the new copy."""
        if not self.follow(shard, answer):
            return False
        self._reconnect(shard, conn)
        conn.gone = False
        return True

    def _may_send(self, shard: int, conn: _Conn) -> None:
        """Raise ShardUnavailable at once for an owner that was not there last time and still
        is not (unless another copy is primary now: the shard moves there), or while the
        shard's breaker is open."""
        if conn.gone:
            if self._socket_missing(shard):
                if not self._follow(shard, conn, None):
                    raise self._gone(shard)
            conn.gone = False
        if self._open_until[shard]:
            self._breaker(shard)

    def _attempt(self, shard: int, conn: _Conn, seq: int, frame: bytes, wait_ms: int) -> Any:
        """Send ``frame`` once and wait up to ``wait_ms`` for its reply; _SILENT if none. The
        frame goes over the unix connection when there is one and it is no longer than
        CLIENT_MAX_FRAME; if that connection breaks, over the DEALER for the rest of the wait."""
        now = time.monotonic()
        deadline = now + wait_ms / 1000
        stream = conn.unix
        if stream is None and conn.unix_path is not None and now >= conn.unix_retry_at:
            stream = self._unix_to(conn)
        if stream is not None and len(frame) <= CLIENT_MAX_FRAME:
            try:
                stream.send(frame, wait_ms)
                return self._wait_reply(shard, conn, seq, stream, wait_ms, deadline)
            except StreamBroken as exc:
                log.debug("shard %d: %s; sending sequence %d through ZeroMQ", shard, exc, seq)
                self.counters.mine()["unix_fallbacks"] += 1
                if conn.unix is stream:
                    conn.unix = None
                    conn.unix_retry_at = time.monotonic() + UNIX_RETRY_S
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    return _SILENT
        try:
            conn.sock.send(frame, zmq.NOBLOCK, len(frame) < ZERO_COPY_MIN)
        except zmq.Again:
            pass  # the queue to that peer is full: wait out the timeout, then retry
        return self._wait_reply(shard, conn, seq, None, wait_ms, deadline)

    def _wait_reply(self, shard: int, conn: _Conn, seq: int, stream: UnixStream | None,
                    wait_ms: int, deadline: float) -> Any:
        """Wait up to ``wait_ms`` (until ``deadline``) for the reply to ``seq`` on ``stream``,
        or on the DEALER when None; _SILENT if none, _GONE when the owner is not running.
        StreamBroken when the stream breaks."""
        probe = self._ipc_paths[shard] is not None
        while wait_ms > 0:
            # A first short wait, then (ipc) a look for the owner's socket file: a reply in
            # time costs nothing more than before.
            first = PROBE_MS if probe and wait_ms > PROBE_MS else wait_ms
            if stream is not None:
                reply = stream.recv(first)
            else:
                conn.sock.setsockopt(zmq.RCVTIMEO, first)
                try:
                    reply = conn.sock.recv()
                except zmq.Again:
                    reply = None
            if reply is None:
                if first == wait_ms:
                    break
                probe = False
                if self._socket_missing(shard, recheck=True):
                    conn.gone = True
                    self._reconnect(shard, conn)  # drops the queued request: none applies
                    return _GONE
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
                 silent_ok: bool = False, map_version: int = 0) -> dict[int, Any]:
        """Send requests ``shard -> (code, body)`` to several shards at once, wait for every
        reply; routed by the slot map of ``map_version``, and writes answered SlotsMoving
        sent again as ``request`` does.

        Returns shard -> reply body, or shard -> Error for a shard that answered with an
        error; a shard that stays silent through every retry raises ShardUnavailable (or,
        with ``silent_ok``, gets a ShardUnavailable as its result).

        A request to one shard alone takes ``request``'s path (and so the unix connection to
        an owner on this host): same replies, same errors.
        """
        if len(parts) == 1 and not silent_ok:
            ((shard, (code, body)),) = parts.items()
            return {shard: self.request(shard, code, body, write=write, map_version=map_version)}
        return self._requests(parts, write, silent_ok, map_version)

    def _requests(self, parts: dict[int, tuple[int, Any]], write: bool, silent_ok: bool,
                  map_version: int) -> dict[int, Any]:
        conns = {s: self._conn(s) for s in parts}
        gone = {s for s in parts if conns[s].gone and self._still_gone(s, conns[s])}
        blocked = self._blocked_of(parts, gone, silent_ok)
        until = getattr(self._deadlines, "at", None)
        frames, seqs = self._frames(parts, conns, write, map_version)
        sent_at = time.monotonic()
        results: dict[int, Any] = {s: self._open(s) for s in blocked}
        pending = set(parts) - gone - blocked
        for attempt in range(self.retries + 1):
            if not pending:
                break
            wait_s = self._wait_s(until, write)
            if wait_s <= 0:
                if attempt > 0:
                    raise self._gave_up(conns, pending, write, sent_at)
                raise self._past_deadline(min(pending), sent=False, write=write)
            for s in pending:
                try:
                    conns[s].sock.send(frames[s], zmq.NOBLOCK, len(frames[s]) < ZERO_COPY_MIN)
                except zmq.Again:
                    pass  # the queue to that peer is full: wait out the timeout, then retry
            self._collect(conns, seqs, pending, gone, results, wait_s)
            if not pending:
                break
            self._note_silence(attempt, [(s, seqs[s]) for s in sorted(pending)])
            if attempt < self.retries:
                for s in pending:
                    self._reconnect(s, conns[s])
        self._settle(parts, conns, seqs, results, pending, gone, write, until, map_version)
        return self._outcome(conns, results, pending, gone, silent_ok)

    def _settle(self, parts: dict[int, tuple[int, Any]], conns: dict[int, _Conn],
                seqs: dict[int, int], results: dict[int, Any], pending: set[int],
                gone: set[int], write: bool, until: float | None, map_version: int) -> None:
        """Follow the shards that moved to another copy (``_follow_moves``); send the writes
        answered SlotsMoving again until they are not; note the acks."""
        if self.copies.replicated:
            self._follow_moves(parts, conns, seqs, results, pending, gone, write, until,
                               map_version)
        moving = sorted(s for s, r in results.items() if type(r) is SlotsMoving)
        if moving and write:
            waits = self._moving_waits(until, write)
            cid = self._tls.client_id
            while moving and next(waits):
                for s in moving:
                    code, body = parts[s]
                    frame = pack_request(code, cid, seqs[s], body, self.copies.epochs[s],
                                         map_version)
                    answer = self._exchange(s, conns[s], seqs[s], frame, until, write)
                    _sort_answer(s, answer, results, pending, gone)
                moving = [s for s in moving if type(results.get(s)) is SlotsMoving
                          and s not in pending and s not in gone]
        if write:
            for s, r in results.items():
                if not isinstance(r, Error):
                    self.note_ack(s, r)

    def _follow_moves(self, parts: dict[int, tuple[int, Any]], conns: dict[int, _Conn],
                      seqs: dict[int, int], results: dict[int, Any], pending: set[int],
                      gone: set[int], write: bool, until: float | None,
                      map_version: int) -> None:
        """For each shard that answered NotPrimary, stayed silent or is not running: when
        another copy is primary now, move there and send it the same request (same sequence
        number); its reply goes in ``results``."""
        moved = sorted(s for s in parts if isinstance(results.get(s), NotPrimary)
                       or s in pending or s in gone)
        cid = self._tls.client_id if write else None
        for s in moved:
            code, body = parts[s]
            conn = conns[s]
            answer = results.get(s)
            for _ in range(len(self.config.replica_names) + 1):
                if not self._follow(s, conn, answer if isinstance(answer, NotPrimary) else None):
                    break
                pending.discard(s)
                gone.discard(s)
                frame = pack_request(code, cid, seqs[s], body, self.copies.epochs[s],
                                     map_version)
                answer = self._exchange(s, conn, seqs[s], frame, until, write)
                if _sort_answer(s, answer, results, pending, gone) and not isinstance(
                        answer, NotPrimary):
                    break

    def _frames(self, parts: dict[int, tuple[int, Any]], conns: dict[int, _Conn], write: bool,
                map_version: int) -> tuple[dict[int, bytes], dict[int, int]]:
        """Each shard's request frame under its connection's next sequence number; the
        frames and the numbers."""
        cid = self._tls.client_id if write else None
        frames: dict[int, bytes] = {}
        seqs: dict[int, int] = {}
        for s, (code, body) in parts.items():
            conn = conns[s]
            conn.seq += 1
            seqs[s] = conn.seq
            frames[s] = pack_request(code, cid, conn.seq, body, self.copies.epochs[s],
                                     map_version)
        return frames, seqs

    def _gave_up(self, conns: dict[int, _Conn], pending: set[int], write: bool,
                 sent_at: float) -> DeadlineExceeded:
        """The deadline passed with ``pending`` shards silent: fresh sockets for them (no late
        reply may be read as a later request's), their breakers, and the error."""
        for s in pending:
            self._reconnect(s, conns[s])
            self._trip_after_wait(s, sent_at)
        return self._past_deadline(min(pending), sent=True, write=write)

    def _wait_s(self, until: float | None, write: bool) -> float:
        """How long an attempt may wait: timeout_ms (a write: ``write_wait_ms``), or less to
        keep this thread's deadline (<= 0 once it has passed)."""
        wait_s = (self.write_timeout_ms if write else self.timeout_ms) / 1000
        if until is not None:
            wait_s = min(wait_s, until - time.monotonic())
        return wait_s

    def _still_gone(self, shard: int, conn: _Conn) -> bool:
        """For an owner that was not there last time: True if it still is not (nothing is
        sent to it), else forget that it was gone."""
        if self._socket_missing(shard):
            return True
        conn.gone = False
        return False

    def _collect(self, conns: dict[int, _Conn], seqs: dict[int, int], pending: set[int],
                 gone: set[int], results: dict[int, Any], wait_s: float) -> None:
        """Wait up to ``wait_s`` for the replies of the ``pending`` shards; after a short
        wait, look for the socket file of each ipc owner still silent."""
        now = time.monotonic()
        deadline = now + wait_s
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
                if self._open_until[s]:
                    self._open_until[s] = 0.0  # the probe got through
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
        tripped = {p: self._trip(p) for p in sorted(pending)}
        if silent_ok:
            results.update((g, self._gone(g)) for g in gone)
            results.update(tripped)
            return results
        first = min(gone | pending)
        raise self._gone(first) if first in gone else tripped[first]

    # -- an owner that is not there ----------------------------------------------------------

    def _socket_missing(self, shard: int, *, recheck: bool = False) -> bool:
        """True when the shard's endpoint is ipc, its socket file does not exist, and no
        supervisord of this service runs (the service is down) or supervisord reports the
        owner stopped. (A stopped owner removes the file; a crashed one leaves it, and the
        request keeps its retries, as supervisord restarts a crashed owner; an owner that
        supervisord is starting has no file yet, and the request keeps its retries too.)
        ``recheck``: look twice, PROBE_RECHECK_S apart, as an owner starting over a crashed
        one's file removes that file just before it binds its own."""
        path = self._ipc_paths[shard]
        if path is None or not file_missing(path):
            return False
        if recheck:
            time.sleep(PROBE_RECHECK_S)
            if not file_missing(path):
                return False
        if self.copies.names[shard] != HOME or file_missing(self._supervisor_socket):
            return True
        return self._owner_stopped(shard) and file_missing(path)

    def _owner_stopped(self, shard: int) -> bool:
        """Whether supervisord reports shard ``shard``'s owner stopped, and still does a
        moment later (``ctl restart`` stops it, then starts it). Answers are kept for
        STOPPED_RECHECK_S, so calls to a stopped shard do not each ask supervisord."""
        now = time.monotonic()
        cached = self._stopped_seen.get(shard)
        if cached is not None and now - cached[0] < STOPPED_RECHECK_S:
            return cached[1]
        stopped = _supervisor_state(self._supervisor_socket, shard) in STOPPED_STATES
        if stopped:
            time.sleep(STOPPED_RECHECK_S)
            stopped = _supervisor_state(self._supervisor_socket, shard) in STOPPED_STATES
        self._stopped_seen[shard] = (time.monotonic(), stopped)
        return stopped

    # -- the breaker and deadlines ----------------------------------------------------------

    def _blocked(self, shard: int) -> bool:
        """True while shard ``shard``'s breaker is open (calls fail at once). When it has
        run out, this call is the probe: the others keep failing at once until it is done."""
        now = time.monotonic()
        if now < self._open_until[shard]:
            return True
        self._open_until[shard] = now + self.timeout_ms * (self.retries + 1) / 1000
        return False

    def _blocked_of(self, shards: Any, gone: set[int], silent_ok: bool) -> set[int]:
        """The ``shards`` (not ``gone``) whose breaker is open; ShardUnavailable for the first
        unless ``silent_ok``."""
        blocked = {s for s in shards if s not in gone and self._open_until[s] and self._blocked(s)}
        if blocked and not silent_ok:
            raise self._open(min(blocked))
        return blocked

    def _breaker(self, shard: int) -> None:
        if self._blocked(shard):
            raise self._open(shard)

    def _trip(self, shard: int) -> ShardUnavailable:
        """Open shard ``shard``'s breaker (it stayed silent through every retry); the error."""
        if self.breaker_ms:
            self._open_until[shard] = time.monotonic() + self.breaker_ms / 1000
        return self._unavailable(shard)

    def _trip_after_wait(self, shard: int, sent_at: float) -> None:
        """Open the breaker of a shard that stayed silent past a call's deadline, if the call
        had waited BREAKER_MIN_WAIT for it (a tight deadline alone says nothing of the owner)."""
        if self.breaker_ms and time.monotonic() - sent_at >= BREAKER_MIN_WAIT:
            self._open_until[shard] = time.monotonic() + self.breaker_ms / 1000

    def _open(self, shard: int) -> ShardUnavailable:
        self.counters.mine()["unavailable"] += 1
        left = max(0.0, self._open_until[shard] - time.monotonic())
        return breaker_open(self.config, shard, left,
                            "(through every retry, or past its deadline)",
                            self.copies.endpoints[shard])

    def set_deadline(self, at: float | None) -> float | None:
        """Make ``at`` (monotonic seconds, or None) this thread's deadline; the one before."""
        before: float | None = getattr(self._deadlines, "at", None)
        self._deadlines.at = at
        return before

    def _past_deadline(self, shard: int, *, sent: bool, write: bool) -> DeadlineExceeded:
        self.counters.mine()["deadlines"] += 1
        if not sent:
            fate = "nothing was sent"
        elif write:
            fate = "the write was sent and may yet be applied (as after a timeout)"
        else:
            fate = "the request was sent"
        return DeadlineExceeded(
            f"the call's deadline passed before shard {shard} answered; {fate}",
            hint="allow more time (Client.deadline), or check the shard: lmshard status")

    def _gone(self, shard: int) -> ShardUnavailable:
        self.counters.mine()["unavailable"] += 1
        return ShardUnavailable(
            f"shard {shard} at {self.copies.endpoints[shard]} is not running: its socket file "
            f"{self._ipc_paths[shard]} does not exist (failed at once, not after "
            f"{self.timeout_ms} ms x {self.retries + 1} attempts)",
            hint="start the service with `lmshard up`; `lmshard status` shows which shard "
                 "owners run",
        )

    def _unavailable(self, shard: int) -> ShardUnavailable:
        self.counters.mine()["unavailable"] += 1
        return silent_owner(self.config, shard, self.timeout_ms, self.retries,
                            self.copies.endpoints[shard])

    # -- lifetime ----------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """Forget the parent's context and sockets: they must not cross fork(). This thread's
        unix connections are closed (which closes only this process's copies of them; the
        parent's stay open): a child opens its own."""
        for conn in (getattr(self._tls, "conns", None) or {}).values():
            if conn.unix is not None:
                conn.unix.close()
        self._ctx = None
        self._tls = threading.local()
        self._streams = weakref.WeakSet()
        self._streams_pid = os.getpid()
        self._streams_lock = threading.Lock()

    def close(self) -> None:
        """Close this thread's sockets and the context (sockets of other threads with it), and
        every thread's unix connections (another thread's is shut down, so its next use
        finds it broken, and closed by that thread)."""
        self._closed = True
        conns = getattr(self._tls, "conns", None) or {}
        for conn in conns.values():
            conn.sock.close(linger=0)
            if conn.unix is not None:
                conn.unix.close()
                conn.unix = None
        with self._streams_lock:
            streams = list(self._streams) if self._streams_pid == os.getpid() else []
            self._streams.clear()  # (in a child not reset yet: the parent's, left alone)
        for stream in streams:
            stream.shutdown()
        self._tls = threading.local()
        if self._ctx is not None:
            self._ctx.term() if not conns else self._ctx.destroy(linger=0)
            self._ctx = None


def _sort_answer(shard: int, answer: Any, results: dict[int, Any], pending: set[int],
                 gone: set[int]) -> bool:
    """File the answer of a request sent again to ``shard``: silence in ``pending``, a missing
    socket in ``gone``, a reply in ``results``; whether it was a reply."""
    if answer is _SILENT:
        pending.add(shard)
    elif answer is _GONE:
        gone.add(shard)
    else:
        results[shard] = answer
        return True
    return False
