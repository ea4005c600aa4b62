"""The async client's connections to the shard owners: many requests in flight on one socket.

One DEALER socket per shard, driven by the event loop: a request is packed and sent at once
from the calling coroutine, which then awaits a future; a reader callback on the socket takes
every reply waiting and resolves the future of its sequence number. Nothing waits for another
request, so the coroutines of a process that write to one shard keep many writes in flight and
the owner's group commit applies them together.

Same-host owners (``lmshard.unix_wire``). With ``shard.unix_socket`` on and an ipc endpoint, a
shard's socket also has a plain unix stream connection to the owner (``lmshard.aio_unix``),
opened by the first request that can use it, and a request frame no longer than
CLIENT_MAX_FRAME goes there instead of to the DEALER: the same frame under the same lane and
number, without ZeroMQ's thread hand-offs. Its replies are read by a reader callback too and
resolved by sequence number in the same place as the DEALER's, so a reply counts whichever way
it came. When the connection breaks (the owner stopped, was killed or restarted), every request
in flight on it is sent again over the DEALER at once, within its attempt (the owner applies a
(client id, sequence) once, so a frame that may have reached it can be sent again); a new
connection is tried by a request at most once a UNIX_RETRY_S, or with the next new socket.
Larger frames, and everything that does not go through ``request`` (a writer's streams, watches)
stay on ZeroMQ.

Applied once. The owner keeps, per client id, the last sequence number it applied with its reply,
and answers any request numbered at or below it from that record without applying it. That is
safe for the sync client, which has one request in flight per client id and resends it until
answered. Here many are in flight, so each write takes a *lane*: a client id of its own while it
is in flight (lanes are reused, at most ``MAX_LANES`` per shard). Sequence numbers come from one
counter per shard socket, so replies are told apart by number alone, and each lane's numbers
grow. A retry resends the same frame (same lane, same number), never new content under an old
number.

Lazy Pirate. When a request goes unanswered for ``timeout_ms``, the socket (and the unix
connection) is replaced and every request still awaited is resent on the new one (a request not
answered after ``retries`` resends fails with ``ShardUnavailable``: applied or not, as with the
sync client).

Failover. As the sync client's (``lmshard.connections``): a ``NotPrimary`` answer, or a request
unanswered through every retry, moves the shard's socket to the copy that is primary now (named
by the answer, or found by pinging every copy, in a worker thread); every request in flight to
the shard is resent there under its own lane and number, and the one that met the answer too.
The unix connection is the old copy's: it is closed, and the new copy's opened when its
endpoint is ipc.

Cancellation. A coroutine cancelled (or timed out by ``asyncio.timeout``) before its request is
sent sends nothing. Cancelled after: the request stays in the socket (or the unix connection)
and may be applied, once; it is never resent (not when the unix connection breaks either); its
reply, if it comes, is read and dropped; its lane is free again at once. A later request on that
lane carries a higher number: if it overtakes the cancelled one (on a new socket after a retry),
the owner answers the cancelled one from its record and does not apply it. So a cancelled write
is applied once or not at all, and the client stays usable.

Fork. A child forgets the parent's context and sockets and opens its own on first use; its
copies of the parent's unix connections are closed (the parent's stay open, and stay on the
parent's loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any

import zmq

from lmshard.aio_unix import AsyncUnixStream
from lmshard.client_counters import ClientCounters
from lmshard.config import Config
from lmshard.connections import (
    SEARCH_MS,
    UNIX_RETRY_S,
    OwnerSockets,
    ShardCopies,
    breaker_open,
    silent_owner,
    write_wait_ms,
)
from lmshard.errors import (
    Error,
    NotPrimary,
    ProtocolError,
    ShardUnavailable,
    SlotsMoving,
    TransactionError,
    error_from_wire,
)
from lmshard.protocol import ZERO_COPY_MIN, pack_request, unpack_frame
from lmshard.slot_routes import moving_waits
from lmshard.unix_wire import CLIENT_MAX_FRAME, unix_path

log = logging.getLogger("lmshard.client")

MAX_LANES = 256
"""Most writes one async client keeps in flight per shard; more wait for a lane. (Each lane is a
client id the owner records once, so they are few and reused.)"""


class _Request:
    """A request in flight: its frame (resent as is), the future awaiting its reply."""

    __slots__ = ("frame", "future", "wait_s", "deadline", "attempts", "via")

    def __init__(self, frame: bytes, future: asyncio.Future[Any], wait_s: float, now: float
                 ) -> None:
        self.frame = frame
        self.future = future
        self.wait_s = wait_s
        """How long an attempt waits for the reply (a write's includes replica_timeout)."""
        self.deadline = now + wait_s
        self.attempts = 0
        self.via: AsyncUnixStream | None = None
        """The unix connection it was last sent on (None: the DEALER)."""


class _MovingWaits:
    """The waits of a write answered SlotsMoving before each resend
    (``slot_routes.moving_waits``), for up to ``limit_s`` seconds in all."""

    def __init__(self, limit_s: float) -> None:
        self._waits = moving_waits()
        self._until = time.monotonic() + limit_s

    async def over(self) -> bool:
        """Wait the next wait; False (at once) when the time is up."""
        left = self._until - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(next(self._waits), left))
        return True


class _Silent:
    """A shard that stayed silent, among the replies of several (its reply is its error)."""

    __slots__ = ("error",)

    def __init__(self, error: ShardUnavailable) -> None:
        self.error = error


class _ShardSocket:
    """One shard's DEALER socket on one event loop, its unix connection to the owner when it
    has one, the requests in flight on them by sequence number (oldest first), and its
    lanes."""

    def __init__(self, shard: int, sock: zmq.Socket[bytes], endpoint: str,
                 loop: asyncio.AbstractEventLoop, unix_socket: bool) -> None:
        self.shard = shard
        self.sock = sock
        self.endpoint = endpoint
        """The endpoint of the copy the socket is connected to."""
        self.fd = sock.fileno()
        self.loop = loop
        self.seq = 0
        self.inflight: dict[int, _Request] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.free: list[bytes] = []
        self.lanes = 0
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.unix: AsyncUnixStream | None = None
        """The unix connection to the owner at ``endpoint``, if one is open."""
        self.unix_path: str | None = None
        """That owner's unix socket (None: ZeroMQ only, by config or endpoint)."""
        self.unix_retry_at = 0.0
        """When (loop time) a request may next try to open the unix connection."""
        self.unix_sent = 0
        """Frames sent over unix connections (resends included)."""
        self.aim(endpoint, unix_socket)

    def aim(self, endpoint: str, unix_socket: bool) -> None:
        """Send to the copy at ``endpoint`` from now on (the same one after a timeout): the
        unix connection open now is closed, and the next request opens one to that copy."""
        self.endpoint = endpoint
        if self.unix is not None:
            self.unix.close()
            self.unix = None
        self.unix_path = unix_path(endpoint) if unix_socket else None
        self.unix_retry_at = 0.0


class AsyncOwnerConnections(OwnerSockets):
    """An async client's sockets to every shard owner, and requests over them; one event loop
    at a time (a client used from a new loop opens new sockets)."""

    def __init__(self, config: Config, counters: ClientCounters, *, timeout_ms: int,
                 retries: int, breaker_ms: int = 0) -> None:
        self.config = config
        self.counters = counters
        self.timeout_ms = timeout_ms
        self.write_timeout_ms = write_wait_ms(config, timeout_ms)
        self.retries = retries
        self.breaker_ms = breaker_ms
        self.copies = ShardCopies(config)
        """The copy each shard's requests go to, and the highest epoch seen."""
        self.on_ack = None
        self._open_until = [0.0] * config.shards
        """Per shard: until when (loop time) calls fail at once, the circuit breaker of the
        sync client's connections; 0.0 while the shard answers."""
        self._ctx: zmq.Context[Any] | None = None
        self._shards: dict[int, _ShardSocket] = {}
        self._closed = False

    def _grow_arrays(self, config: Config) -> None:
        self._open_until.extend([0.0] * (config.shards - len(self._open_until)))

    # -- sockets -----------------------------------------------------------------------------

    def _shard(self, shard: int) -> _ShardSocket:
        sh = self._shards.get(shard)
        loop = asyncio.get_running_loop()
        if sh is None or sh.loop is not loop:
            if sh is not None:
                self._drop(sh)
            sh = self._shards[shard] = _ShardSocket(shard, self.socket(shard),
                                                    self.copies.endpoints[shard], loop,
                                                    self.config.unix_socket)
            loop.add_reader(sh.fd, self._take_replies, sh)
        return sh

    def _drop(self, sh: _ShardSocket) -> None:
        """Close a shard socket of a loop no longer in use; its requests fail."""
        if not sh.loop.is_closed():
            sh.loop.remove_reader(sh.fd)
            for req in sh.inflight.values():
                if not req.future.done():
                    req.future.set_exception(TransactionError("the client was closed"))
        if sh.timer is not None:
            sh.timer.cancel()
        sh.inflight.clear()
        sh.sock.close(linger=0)
        if sh.unix is not None:
            sh.unix.close()
            sh.unix = None

    # -- lanes -------------------------------------------------------------------------------

    async def _lane(self, sh: _ShardSocket) -> bytes:
        if sh.free:
            return sh.free.pop()
        if sh.lanes < MAX_LANES:
            sh.lanes += 1
            return uuid.uuid4().bytes
        waiter: asyncio.Future[bytes] = sh.loop.create_future()
        sh.waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(sh, waiter.result())  # handed over just as we were cancelled
            raise

    @staticmethod
    def _release(sh: _ShardSocket, lane: bytes) -> None:
        while sh.waiting:
            waiter = sh.waiting.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        sh.free.append(lane)

    # -- requests ----------------------------------------------------------------------------

    async def request(self, shard: int, code: int, body: Any, *, write: bool,
                      map_version: int = 0) -> Any:
        """Send one request and await its reply body (or the Error the owner answered with);
        ShardUnavailable when the owner stays silent through every retry. ``map_version``:
        the version of the slot map the request was routed by; a write answered SlotsMoving
        is sent again (same lane and number) after a short wait, until it is not or as long
        as the retries would wait for a silent owner."""
        sh = self._shard(shard)
        if self._open_until[shard]:
            self._breaker(sh)
        lane = await self._lane(sh) if write else None
        try:
            sh.seq += 1
            reply = await self._answer(sh, lane, sh.seq, code, body, write, map_version)
            if self._open_until[shard]:
                self._open_until[shard] = 0.0  # the probe got through
            if write and not isinstance(reply, Error):
                self.note_ack(shard, reply)
            return reply
        finally:
            if lane is not None:
                self._release(sh, lane)

    async def _answer(self, sh: _ShardSocket, lane: bytes | None, seq: int, code: int,
                      body: Any, write: bool, map_version: int) -> Any:
        """The answer to request ``seq``: sent, and sent again to the copy that is primary
        now after a NotPrimary answer or silence, and after a wait while it is SlotsMoving."""
        shard = sh.shard
        moves = 0
        waits: _MovingWaits | None = None
        while True:
            sent_to = sh.endpoint
            frame = pack_request(code, lane, seq, body, self.copies.epochs[shard],
                                 map_version)
            try:
                reply = await self._exchange(sh, seq, frame, write)
            except ShardUnavailable:  # silent through every retry
                if moves > len(self.config.replica_names) or not await self._follow(
                        sh, sent_to, None):
                    raise
            else:
                if type(reply) is SlotsMoving and write:
                    waits = waits or _MovingWaits(self.moving_limit_s(write))
                    if await waits.over():
                        continue  # the same request, same lane and number
                if (not isinstance(reply, NotPrimary)
                        or moves > len(self.config.replica_names)
                        or not await self._follow(sh, sent_to, reply)):
                    break
            moves += 1  # the same request, same lane and number, to the new copy
        return reply

    async def _exchange(self, sh: _ShardSocket, seq: int, frame: bytes, write: bool) -> Any:
        """Send request ``seq`` and await its reply (resent on a new socket after each
        timeout); ShardUnavailable after every retry."""
        future: asyncio.Future[Any] = sh.loop.create_future()
        wait_ms = self.write_timeout_ms if write else self.timeout_ms
        req = sh.inflight[seq] = _Request(frame, future, wait_ms / 1000, sh.loop.time())
        if sh.timer is None:
            sh.timer = sh.loop.call_at(sh.inflight[next(iter(sh.inflight))].deadline,
                                       self._check_deadlines, sh)
        self._send(sh, req)
        try:
            return await future
        finally:
            sh.inflight.pop(seq, None)  # cancelled: never resent; a late reply is dropped

    async def _follow(self, sh: _ShardSocket, sent_to: str, answer: NotPrimary | None
                      ) -> bool:
        """After ``answer`` (None: silence) from the copy at ``sent_to``, move the shard to
        the copy that is primary now (``ShardCopies.target``, its ping in a worker thread),
        unless another request moved it already; whether it moved. The socket then goes to
        the new copy, with every request in flight."""
        shard = sh.shard
        if not self.copies.replicated:
            return False
        if self.copies.endpoints[shard] == sent_to:
            name = await sh.loop.run_in_executor(
                None, self.copies.target, shard, answer, self.context(),
                min(self.timeout_ms, SEARCH_MS))
            if self.copies.endpoints[shard] == sent_to:  # (no other request moved it meanwhile)
                if name is None:
                    return False
                self.copies.move(shard, name)
                self._open_until[shard] = 0.0  # the breaker was the old copy's
        if sh.endpoint != self.copies.endpoints[shard]:
            self._reconnect(sh)
        return True

    async def requests(self, parts: dict[int, tuple[int, Any]], *, write: bool,
                       silent_ok: bool = False, map_version: int = 0) -> dict[int, Any]:
        """Requests ``shard -> (code, body)`` to several shards at once; every reply body (or
        Error). A shard silent through every retry raises ShardUnavailable once all others
        answered (with ``silent_ok``, gets it as its result)."""
        async def settled(shard: int, code: int, body: Any) -> Any:
            try:
                return await self.request(shard, code, body, write=write,
                                          map_version=map_version)
            except ShardUnavailable as exc:
                return _Silent(exc)

        if len(parts) == 1:
            [(s, (code, body))] = parts.items()
            replies = [await settled(s, code, body)]
        else:
            replies = await asyncio.gather(*(settled(s, code, body)
                                             for s, (code, body) in parts.items()))
        out = dict(zip(parts, replies, strict=True))
        for s, r in out.items():
            if isinstance(r, _Silent):
                if not silent_ok:
                    raise r.error
                out[s] = r.error
        return out

    def _send(self, sh: _ShardSocket, req: _Request) -> None:
        """Send ``req``'s frame over the shard's unix connection (opened now if there is none
        and a try is due) when it is no longer than CLIENT_MAX_FRAME, else over the DEALER."""
        frame = req.frame
        if sh.unix_path is not None and len(frame) <= CLIENT_MAX_FRAME:
            stream = sh.unix or self._open_unix(sh)
            if stream is not None:
                req.via = stream
                sh.unix_sent += 1
                stream.send(frame)  # (a break resends it over the DEALER: _unix_broken)
                return
        req.via = None
        try:
            sh.sock.send(frame, zmq.NOBLOCK, len(frame) < ZERO_COPY_MIN)
        except zmq.Again:
            pass  # the queue to that owner is full: the timeout resends it
        # A send may take the socket's wake-up for replies that arrived meanwhile (ZeroMQ's
        # file descriptor is edge-triggered): take them now, or nobody would.
        self._take_replies(sh)

    def _take_replies(self, sh: _ShardSocket) -> None:
        """Every reply waiting on the DEALER."""
        sock = sh.sock
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us (client closed)
            self._resolve(sh, frame)

    def _resolve(self, sh: _ShardSocket, frame: bytes) -> None:
        """A reply frame, whichever way it came, to the future of its sequence number."""
        try:
            seq, status, body = unpack_frame(frame)
        except (ProtocolError, ValueError, TypeError):
            log.warning("shard %d: an unreadable reply was dropped", sh.shard)
            return
        req = sh.inflight.pop(seq, None)
        if req is None or req.future.done():
            return  # the reply to a cancelled request, or a second reply to a resent one
        req.future.set_result(body if status == 0 else error_from_wire(status, *body))

    # -- the unix connection -----------------------------------------------------------------

    def _open_unix(self, sh: _ShardSocket) -> AsyncUnixStream | None:
        """Open the shard's unix connection, unless a try failed or one broke less than
        UNIX_RETRY_S ago; None when there is none (the request goes over the DEALER)."""
        path = sh.unix_path
        now = sh.loop.time()
        if path is None or now < sh.unix_retry_at:
            return None
        stream = AsyncUnixStream.connect(path, sh.loop, lambda frame: self._resolve(sh, frame),
                                         lambda s, why: self._unix_broken(sh, s, why))
        if stream is None:
            sh.unix_retry_at = now + UNIX_RETRY_S
        sh.unix = stream
        return stream

    def _unix_broken(self, sh: _ShardSocket, stream: AsyncUnixStream, why: str) -> None:
        """The unix connection ``stream`` broke: every request in flight on it goes over the
        DEALER now, in the same attempt (its frame may have reached the owner: the owner
        applies a (client id, sequence) once, whichever way it came)."""
        if sh.unix is stream:
            sh.unix = None
            sh.unix_retry_at = sh.loop.time() + UNIX_RETRY_S
        again = [req for req in sh.inflight.values()
                 if req.via is stream and not req.future.done()]
        log.debug("shard %d: %s; sending %d requests through ZeroMQ", sh.shard, why,
                  len(again))
        self.counters.mine()["unix_fallbacks"] += len(again)
        for req in again:
            self._send(sh, req)

    # -- Lazy Pirate -------------------------------------------------------------------------

    def _check_deadlines(self, sh: _ShardSocket) -> None:
        sh.timer = None
        if not sh.inflight or self._shards.get(sh.shard) is not sh:
            return
        now = sh.loop.time()
        late = [req for req in sh.inflight.values() if req.deadline <= now]
        if late:
            self._retry(sh, late, now)
        if sh.inflight:  # the oldest request has the earliest deadline
            first = sh.inflight[next(iter(sh.inflight))]
            sh.timer = sh.loop.call_at(first.deadline, self._check_deadlines, sh)

    def _retry(self, sh: _ShardSocket, late: list[_Request], now: float) -> None:
        """Replace the socket and resend every request still awaited, oldest first; fail those
        that used up their retries."""
        counters = self.counters.mine()
        counters["timeouts"] += len(late)
        for req in late:
            req.attempts += 1
            if req.attempts > self.retries and not req.future.done():
                counters["unavailable"] += 1
                if self.breaker_ms:
                    self._open_until[sh.shard] = now + self.breaker_ms / 1000
                req.future.set_exception(self._unavailable(sh.shard))
        for seq in [s for s, r in sh.inflight.items() if r.future.done()]:
            del sh.inflight[seq]
        counters["retries"] += len(sh.inflight)
        if sh.inflight:
            log.info("shard %d did not answer in %d ms: reconnecting, resending %d requests "
                     "from sequence %d", sh.shard, self.timeout_ms, len(sh.inflight),
                     next(iter(sh.inflight)))
        self._reconnect(sh)

    def _reconnect(self, sh: _ShardSocket) -> None:
        """A new socket (and unix connection) to the shard's current copy; every request in
        flight resent on it, oldest first."""
        sh.loop.remove_reader(sh.fd)
        sh.sock.close(linger=0)
        sh.aim(self.copies.endpoints[sh.shard], self.config.unix_socket)
        sh.sock = self.socket(sh.shard)
        sh.fd = sh.sock.fileno()
        sh.loop.add_reader(sh.fd, self._take_replies, sh)
        now = sh.loop.time()
        for req in list(sh.inflight.values()):
            req.deadline = now + req.wait_s
            self._send(sh, req)

    def _breaker(self, sh: _ShardSocket) -> None:
        """ShardUnavailable at once while the shard's breaker is open; when it has run out
        this call is the probe, and the others keep failing at once until it is done."""
        now = sh.loop.time()
        if now < self._open_until[sh.shard]:
            self.counters.mine()["unavailable"] += 1
            raise breaker_open(self.config, sh.shard, self._open_until[sh.shard] - now,
                               "through every retry")
        self._open_until[sh.shard] = now + self.timeout_ms * (self.retries + 1) / 1000

    def _unavailable(self, shard: int) -> ShardUnavailable:
        return silent_owner(self.config, shard, self.timeout_ms, self.retries)

    # -- lifetime ----------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """Forget the parent's context and sockets: they must not cross fork(). This process's
        copies of the unix connections' descriptors are closed (the parent's stay open)."""
        for sh in self._shards.values():
            if sh.unix is not None:
                sh.unix.forget()
        self._ctx = None
        self._shards = {}

    def close(self) -> None:
        """Close every socket and the context; requests still awaited fail."""
        self._closed = True
        for sh in self._shards.values():
            self._drop(sh)
        self._shards = {}
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None



async def readable(socks: list[zmq.Socket[bytes]], timeout: float) -> None:
    """Wait until one of ``socks`` has a message to read, at most ``timeout`` seconds (a
    writer's streams, a watch's feeds: sockets read with non-blocking receives)."""
    if timeout <= 0 or any(int(s.getsockopt(zmq.EVENTS)) & zmq.POLLIN for s in socks):
        return
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    fds = [s.fileno() for s in socks]
    for fd in fds:
        loop.add_reader(fd, wake)
    timer = loop.call_later(timeout, wake)
    try:
        await woken
    finally:
        timer.cancel()
        for fd in fds:
            loop.remove_reader(fd)
