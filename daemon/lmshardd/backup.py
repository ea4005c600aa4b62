"""The owner side of backups: a commit barrier in the loop, a streaming thread beside it.

Two halves, so a backup never holds writes up for longer than the barrier:

- ``BackupChannel`` runs in the owner's loop thread. It takes the pause (``owner.paused``, set
  between two group commits), opens the snapshot's read transaction, and lifts the pause, by
  request or by itself once the pause times out (a coordinator that vanished).
- ``BackupServer`` is a thread of its own. It owns the backup ROUTER socket, talks to the loop
  over an inproc PAIR, and for each snapshot starts a copier thread that writes a compacted
  copy of the environment from the snapshot's transaction (``env.copyfd(compact=True, txn=)``)
  into a pipe. The server reads the pipe only while the coordinator has granted credit, so a
  slow reader stops the copier (its pipe is full) instead of filling memory.

A coordinator may try the cut more than once in one backup session; every message carries the
attempt it belongs to, and the owner keys its pause, its snapshots and its streams by
``(session, attempt)`` (a ``Cut``), so nothing of an abandoned attempt is mistaken for the
current one. Requests go to the loop with the peer's routing id and come back with it.

py-lmdb opens every environment with MDB_NOTLS, so a read transaction begun in the loop thread
may be used by the copier thread, as long as one thread at a time uses it. The messages are
declared in ``lmshard.backup_wire``; this side reads and builds every frame through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import lmdb
import zmq

from lmshard import security
from lmshard.backup_wire import (
    CANCEL,
    CHUNK,
    CREDIT,
    END,
    ERROR,
    MAX_CONTROL_FRAME,
    MAX_IN_FLIGHT,
    MAX_PAUSE_TIMEOUT,
    NO_ATTEMPT,
    PAUSE,
    PAUSED,
    READY,
    RESUME,
    RESUMED,
    SESSION_SIZE,
    SNAPSHOT,
    decode,
    pack,
)
from lmshard.errors import Error, ProtocolError
from lmshard.named_dbs import copy_size_estimate
from lmshard.wire import Message

log = logging.getLogger("lmshardd.backup")

MAX_STREAMS = 4
"""Snapshots one owner streams at a time; each holds a read transaction and a copier thread."""
STREAM_IDLE_TIMEOUT = 60.0
"""Seconds a stream may wait for credit before the owner drops it (and its read transaction)."""
PAUSED_WAIT_MS = 5
"""While paused, the loop waits this long on the control socket per turn instead of spinning."""
SERVER_POLL_MS = 100
"""How long the streaming thread waits for input before it looks at idle streams and stop."""


def make_channel(owner: Any) -> BackupChannel:
    """Every owner serves backups on its copy's backup endpoint (``Member.backup_endpoint``)."""
    return BackupChannel(owner)


Cut = tuple[bytes, int]
"""``(session, attempt)``: one attempt of one backup at the cut."""


@dataclass
class _Pause:
    ident: bytes  # the coordinator's routing id, for the ERROR when the pause expires
    session: bytes
    attempt: int
    started: float  # perf_counter, of the session's first attempt while writes stayed held
    deadline: float  # monotonic


class BackupChannel:
    """The loop-thread half: the commit barrier and the snapshot transactions."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.env: lmdb.Environment = owner.env
        ctx: zmq.Context[Any] = owner.ctx
        endpoint = owner.member.backup_endpoint
        router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_FRAME)
        # Credit bounds what is queued (MAX_IN_FLIGHT per stream); a high-water mark would
        # drop chunks silently instead.
        router.setsockopt(zmq.SNDHWM, 0)
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[6:]), mode=0o700, exist_ok=True)
        security.secure_server(router, owner.config, endpoint)
        router.bind(endpoint)
        ctl_endpoint = f"inproc://lmshard-backup-{owner.shard}-{id(self):x}"
        self.ctl: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.bind(ctl_endpoint)
        self.endpoint = endpoint
        self.pause: _Pause | None = None
        self.server = BackupServer(ctx, self.env, router, ctl_endpoint, owner.shard)
        self.server.start()
        log.info("shard %d serves backups on %s", owner.shard, endpoint)

    # -- Channel ---------------------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return [self.ctl]

    def on_readable(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                request = self.ctl.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(request)

    def tick(self, now: float) -> None:
        p = self.pause
        if p is None:
            return
        if now >= p.deadline:
            held = (time.perf_counter() - p.started) * 1000
            self._lift()
            log.warning("lifted the backup pause after %.0f ms: the coordinator sent no "
                        "snapshot request in time (it went away, or another shard was slow)",
                        held)
            self._tell("expired", p.ident, p.session, p.attempt, Error.code, "the pause expired "
                       "before the snapshot request came: the cut is void",
                       "run the backup again")
            return
        # Held writes keep the write socket readable, so the loop would spin: wait here for
        # the coordinator's next word instead.
        if self.ctl.poll(PAUSED_WAIT_MS):
            self.on_readable(self.ctl)

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        pass

    def close(self) -> None:
        if self.pause is not None:
            self._lift()
        self.server.stop()
        self.ctl.close(linger=0)
        if self.endpoint.startswith("ipc://"):  # leave no stale socket file for the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint[6:])

    # -- the barrier -----------------------------------------------------------------------------

    def _handle(self, request: tuple[Any, ...]) -> None:
        kind, ident, session, attempt = request[:4]
        if kind == "pause":
            self._pause(ident, session, attempt, request[4])
        elif kind == "snapshot":
            self._snapshot(ident, session, attempt, request[4])
        elif kind == "resume":
            p = self.pause
            if p is not None and p.session == session and p.attempt <= attempt:
                self._lift()
            self._tell("resumed", ident, session, attempt)

    def _pause(self, ident: bytes, session: bytes, attempt: int, timeout_ms: int) -> None:
        p = self.pause
        if p is not None and p.session != session:
            self._tell("error", ident, session, attempt, Error.code, "another backup holds this "
                       "shard's commit barrier", "wait for it to finish, then run the backup "
                       "again")
            return
        if p is not None and attempt < p.attempt:
            self._tell("error", ident, session, attempt, Error.code, f"attempt {attempt} of "
                       f"this backup's cut came after attempt {p.attempt}", None)
            return
        # The loop calls channels between group commits: the one in progress is done. A later
        # attempt of the same backup takes the pause over; writes were held all along.
        self.owner.paused = True
        timeout = min(timeout_ms / 1000, MAX_PAUSE_TIMEOUT)
        started = p.started if p is not None else time.perf_counter()
        self.pause = _Pause(ident, session, attempt, started, time.monotonic() + timeout)
        self._tell("paused", ident, session, attempt, self.env.info()["last_txnid"])

    def _snapshot(self, ident: bytes, session: bytes, attempt: int, consistent: bool) -> None:
        p = self.pause
        if consistent and (p is None or (p.session, p.attempt) != (session, attempt)):
            self._tell("error", ident, session, attempt, Error.code, "this backup holds no pause "
                       "on the shard for this attempt (it expired, or PAUSE was never sent)",
                       "run the backup again")
            return
        try:
            txn = self.env.begin()
        except lmdb.Error as exc:
            if consistent:
                self._lift()
            self._tell("error", ident, session, attempt, Error.code,
                       f"cannot open a snapshot: {exc}", None)
            return
        paused_us = 0
        if consistent:
            assert p is not None
            paused_us = int((time.perf_counter() - p.started) * 1e6)
            self._lift()
        self.server.handoff[session, attempt] = txn
        self._tell("ready", ident, session, attempt, txn.id(), paused_us)

    def _lift(self) -> None:
        self.pause = None
        self.owner.paused = False

    def _tell(self, *answer: Any) -> None:
        self.ctl.send_pyobj(answer)


class _Stream:
    """One snapshot being copied into a pipe by a copier thread, sent as credit allows."""

    def __init__(self, env: lmdb.Environment, txn: lmdb.Transaction, cut: Cut,
                 ident: bytes, chunk_size: int) -> None:
        self.env = env
        self.txn = txn
        self.cut = cut
        self.ident = ident
        self.chunk_size = chunk_size
        self.max_credit = max(1, MAX_IN_FLIGHT // chunk_size)
        self.credit = 0
        self.offset = 0
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None
        self.polled = False
        self.last_activity = time.monotonic()
        self.rfd, wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        try:  # a pipe as large as a chunk lets one read take a whole chunk
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, chunk_size)
        except (AttributeError, OSError):
            pass
        self.copier = threading.Thread(target=self._copy, args=(wfd,), daemon=True,
                                       name=f"backup-copy-{cut[0].hex()[:8]}-{cut[1]}")
        self.copier.start()

    def _copy(self, wfd: int) -> None:
        try:
            self.env.copyfd(wfd, compact=True, txn=self.txn)
        except BaseException as exc:  # reported to the coordinator when the pipe ends
            self.error = exc
        finally:
            os.close(wfd)

    def read(self) -> bytes | None:
        """Up to a chunk from the pipe: b"" once the copier is done, None if nothing is there."""
        parts: list[bytes] = []
        size, eof = 0, False
        while size < self.chunk_size:
            try:
                part = os.read(self.rfd, self.chunk_size - size)
            except BlockingIOError:
                break
            if not part:
                eof = True
                break
            parts.append(part)
            size += len(part)
        if parts:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return b"" if eof else None

    def close(self) -> None:
        """Stop the copier (its pipe breaks), then release the read transaction."""
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1
        self.copier.join()
        self.txn.abort()


class BackupServer(threading.Thread):
    """The streaming half: the backup ROUTER, the snapshots' pipes, the credit."""

    def __init__(self, ctx: zmq.Context[Any], env: lmdb.Environment,
                 router: zmq.Socket[bytes], ctl_endpoint: str, shard: int) -> None:
        super().__init__(name=f"backup-{shard:02d}", daemon=True)
        self.ctx = ctx
        self.env = env
        self.router = router
        self.ctl_endpoint = ctl_endpoint
        self.shard = shard
        self.main_db = env.open_db(None)
        self.page_size = env.stat()["psize"]
        self.handoff: dict[Cut, lmdb.Transaction] = {}  # snapshot txns the loop opened
        self.opening: dict[Cut, int] = {}  # chunk size of each snapshot the loop is asked for
        self.cancelled: set[Cut] = set()  # snapshots cancelled while the loop opens them
        self.streams: dict[Cut, _Stream] = {}
        self.poller = zmq.Poller()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        ctl: zmq.Socket[bytes] = self.ctx.socket(zmq.PAIR)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.connect(self.ctl_endpoint)
        self.ctl = ctl
        poller = self.poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                self._poll_streams_with_credit()
                events = dict(poller.poll(SERVER_POLL_MS))
                if self.router in events:
                    self._drain_router()
                if ctl in events:
                    self._drain_ctl()
                for s in list(self.streams.values()):
                    if s.polled and s.rfd in events:
                        self._send_chunk(s)
                self._drop_idle()
        except Exception:
            log.exception("shard %d: the backup server failed; backups are off until the "
                          "owner restarts", self.shard)
        finally:
            self._release_all()

    def _poll_streams_with_credit(self) -> None:
        """Watch the pipe of every stream that may send, and only those."""
        for s in self.streams.values():
            want = s.credit > 0
            if want != s.polled:
                if want:
                    self.poller.register(s.rfd, zmq.POLLIN)
                else:
                    self.poller.unregister(s.rfd)
                s.polled = want

    def _release_all(self) -> None:
        """End every stream, abort every snapshot not yet streamed, close the sockets."""
        for s in list(self.streams.values()):
            self._end(s)
        for txn in self.handoff.values():
            txn.abort()
        self.handoff.clear()
        self.ctl.close(linger=0)
        self.router.close(linger=0)

    # -- the coordinator's requests --------------------------------------------------------------

    def _send(self, ident: bytes, m: Message, cut: Cut, *values: Any) -> None:
        self.router.send_multipart([ident, pack(m, *cut, *values)])

    def _error(self, ident: bytes, cut: Cut, err: Error) -> None:
        self._send(ident, ERROR, cut, err.code, err.message[:4000], err.hint or None)

    def _drain_router(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, rest = frames[0], frames[1:]
            try:
                m, session, attempt, values, _ = decode(rest, "coordinator")
                if len(session) != SESSION_SIZE:
                    raise ProtocolError(f"{m.name}: the session must be {SESSION_SIZE} bytes")
            except Error as exc:
                self._error(ident, (b"", NO_ATTEMPT), exc)
                continue
            except Exception as exc:  # a hostile frame must never stop backups
                self._error(ident, (b"", NO_ATTEMPT),
                            ProtocolError(f"invalid backup message: {exc}"))
                continue
            self._request(ident, m, (session, attempt), values)

    def _request(self, ident: bytes, m: Message, cut: Cut, values: list[Any]) -> None:
        stream = self.streams.get(cut)
        if m is CREDIT:
            if stream is None:
                self._error(ident, cut, ProtocolError("CREDIT for no open stream"))
                return
            stream.credit = min(stream.credit + values[0], stream.max_credit)
            stream.last_activity = time.monotonic()
        elif m is CANCEL:
            self._cancel(cut)
        elif m is PAUSE:
            self.ctl.send_pyobj(("pause", ident, *cut, values[0]))
        elif m is RESUME:
            self.ctl.send_pyobj(("resume", ident, *cut))
        elif m is SNAPSHOT:
            self._ask_snapshot(ident, cut, *values)

    def _cancel(self, cut: Cut) -> None:
        """End ``cut``'s stream, or have its snapshot aborted as soon as the loop opens it."""
        stream = self.streams.get(cut)
        if stream is not None:
            log.info("shard %d: backup stream cancelled at %d bytes", self.shard, stream.offset)
            self._end(stream)
        elif cut in self.opening:
            self.cancelled.add(cut)

    def _ask_snapshot(self, ident: bytes, cut: Cut, consistent: bool, chunk_size: int) -> None:
        if cut in self.streams or cut in self.opening:
            self._error(ident, cut, ProtocolError("this attempt already has a snapshot"))
        elif len(self.streams) + len(self.opening) >= MAX_STREAMS:
            self._error(ident, cut, Error(f"this shard streams {MAX_STREAMS} backups already",
                                          hint="wait for one to finish"))
        else:
            self.opening[cut] = chunk_size
            self.ctl.send_pyobj(("snapshot", ident, *cut, consistent))

    # -- the loop's answers ----------------------------------------------------------------------

    def _drain_ctl(self) -> None:
        while True:
            try:
                answer = self.ctl.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, ident, cut, rest = answer[0], answer[1], (answer[2], answer[3]), answer[4:]
            if kind == "ready":
                txn = self.handoff.pop(cut)
                chunk_size = self.opening.pop(cut, None)
                if chunk_size is None or cut in self.cancelled:
                    self.cancelled.discard(cut)
                    txn.abort()
                else:
                    self._start(ident, cut, txn, chunk_size, *rest)
            elif kind == "paused":
                self._send(ident, PAUSED, cut, *rest)
            elif kind == "resumed":
                self._send(ident, RESUMED, cut)
            else:  # "error" answers a request, "expired" is the loop's own word
                if kind == "error":
                    self.opening.pop(cut, None)
                    self.cancelled.discard(cut)
                self._send(ident, ERROR, cut, *rest)

    def _start(self, ident: bytes, cut: Cut, txn: lmdb.Transaction, chunk_size: int,
               txn_id: int, paused_us: int) -> None:
        try:
            estimate = copy_size_estimate(txn, self.main_db, self.page_size)
        except (lmdb.Error, ValueError):
            info = self.env.info()
            estimate = (info["last_pgno"] + 1) * self.page_size
        self.streams[cut] = _Stream(self.env, txn, cut, ident, chunk_size)
        self._send(ident, READY, cut, txn_id, estimate, paused_us)
        log.info("shard %d: backup snapshot at txn %d (~%d bytes, attempt %d), writes paused "
                 "%.2f ms", self.shard, txn_id, estimate, cut[1], paused_us / 1000)

    # -- streaming -------------------------------------------------------------------------------

    def _send_chunk(self, s: _Stream) -> None:
        data = s.read()
        if data is None:
            return
        if data:
            self.router.send_multipart([s.ident, pack(CHUNK, *s.cut, s.offset), data],
                                       copy=False)
            s.sha.update(data)
            s.offset += len(data)
            s.credit -= 1
            s.last_activity = time.monotonic()
            return
        s.copier.join()  # the pipe ended: the copier is done
        if s.error is None:
            self._send(s.ident, END, s.cut, s.offset, s.sha.hexdigest())
            log.info("shard %d: backup stream complete, %d bytes", self.shard, s.offset)
        else:
            log.error("shard %d: backup copy failed after %d bytes: %s", self.shard, s.offset,
                      s.error)
            self._error(s.ident, s.cut, Error(f"the copy failed: {s.error}",
                                                  hint="see the owner's log"))
        self._end(s)

    def _end(self, s: _Stream) -> None:
        if s.polled:
            self.poller.unregister(s.rfd)
        s.polled = False
        s.close()
        self.streams.pop(s.cut, None)

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for s in list(self.streams.values()):
            if now - s.last_activity > STREAM_IDLE_TIMEOUT:
                log.warning("shard %d: dropped a backup stream that got no credit for %.0f s "
                            "(at %d bytes): its coordinator went away", self.shard,
                            STREAM_IDLE_TIMEOUT, s.offset)
                self._error(s.ident, s.cut, Error("no credit for too long: stream dropped"))
                self._end(s)
