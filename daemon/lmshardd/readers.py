"""``lmshardd readers --index I``: one process of the reader pool.

Each reader opens every shard's LMDB environment read-only (at start, and on demand for a shard
that does not exist yet, so readers may start before the owners) and serves the owners' read
commands (get, get_many, scan pages, lookup, count) for clients that cannot map the files:
clients on other hosts, or with ``local_reads = false``. supervisord runs ``readers.count`` of
them (``numprocs``); reader I binds its own endpoint (``lmshard.remote.reader_endpoint``) and
clients talk to the readers directly, spreading over them without a broker process, so reads
scale with the number of readers (see docs/security.md and ``lmshard.remote`` for why there is
no broker).

Every frame is decoded with the wire protocol's limits and every body is checked by the read
command's own ``validate`` against the target shard's tables before anything is read; a bad
frame gets a typed error reply, a frame that is not our framing at all is dropped, and neither
stops the process. Replies over the frame limit are answered with LimitExceeded instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb
import zmq

from lmshard import protocol, security, zap
from lmshard.config import MAX_SHARDS, Config, load_config
from lmshard.errors import (
    Error,
    InternalError,
    LimitExceeded,
    ProtocolError,
    SchemaMismatch,
    ShardUnavailable,
)
from lmshard.protocol import PING, READ, READ_COMMANDS, Command, read_parts
from lmshard.remote import reader_endpoints
from lmshard.slot_state import check_slot_state
from lmshard.store import META_DB, Store
from lmshard.store_meta import meta_records
from lmshard.txn import ReadTxn, TableMap
from lmshardd.hangup import report_hangup
from lmshardd.slot_guard import RecordedSlots, SlotGuard, read_guarded

log = logging.getLogger("lmshardd.readers")

POLL_MS = 100
"""How long the loop waits for a request before it looks at signals again."""
REOPEN_INTERVAL = 0.2
"""Seconds between attempts to open a shard that could not be opened yet."""
HWM = 100_000
"""Send and receive high-water marks of the reader's socket, in messages."""


@dataclass
class ReaderCounters:
    """What the reader has done since it started (part of its ping reply)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    bad_frames: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["uptime"] = time.time() - self.started
        return d


class ShardView:
    """One shard opened read-only on first use; reopened after a failure, at most once per
    REOPEN_INTERVAL. Each read looks at the shard's slot state in its own snapshot
    (``guard``)."""

    def __init__(self, config: Config, shard: int, schema: Any) -> None:
        self.config = config
        self.shard = shard
        self.schema = schema
        self.path = config.member(shard, config.local_member).dir  # this host's copy
        self._store: Store | None = None
        self._failed_at = 0.0
        self._failure: Error | None = None
        self._meta_db: Any = None
        self._slots = RecordedSlots(shard, config)

    def store(self) -> Store:
        if self._store is not None:
            return self._store
        now = time.monotonic()
        if self._failure is not None and now - self._failed_at < REOPEN_INTERVAL:
            raise self._failure
        try:
            st = Store(self.path, self.schema, readonly=True,
                       max_readers=self.config.max_readers)
        except Error as exc:
            self._failed_at, self._failure = now, ShardUnavailable(
                f"the reader pool cannot open shard {self.shard} at {self.path} yet: "
                f"{exc.message}",
                hint="the shard's owner creates it on its first start: check it runs")
            log.warning("%s", self._failure.message)
            raise self._failure from None
        try:
            self._check_identity(st)
        except Error as exc:
            st.close()
            self._failed_at, self._failure = now, exc
            log.error("%s", exc)
            raise
        self._store, self._failure = st, None
        log.info("opened shard %d at %s read-only", self.shard, self.path)
        return st

    def _check_identity(self, st: Store) -> None:
        """Refuse to serve a directory the owner recorded as another shard, or whose slot
        state the config may not serve (``check_slot_state``)."""
        env = st.env
        with env.begin() as txn:
            self._meta_db = env.open_db(META_DB, txn=txn, create=False)
            meta = meta_records(env, txn)
        shard_id = meta.get(b"shard_id")
        if shard_id is not None and shard_id != str(self.shard).encode():
            raise SchemaMismatch(
                f"{self.path} holds shard {shard_id.decode()}, the config says {self.shard}",
                hint="check data_dir; never move shard directories")
        check_slot_state(self.config, meta, self.path)

    def guard(self, txn: lmdb.Transaction) -> SlotGuard:
        """The shard's slot state as snapshot ``txn`` sees it (``RecordedSlots``)."""
        return self._slots.guard(txn, self._meta_db)

    def forget_failure(self) -> None:
        """Let the next request try to open the shard at once."""
        self._failure = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class Reader:
    """One reader of the pool: serves read commands for every shard on its own endpoint."""

    def __init__(self, config: Config, index: int = 0, schema: Any = None,
                 context: zmq.Context[Any] | None = None) -> None:
        endpoints = reader_endpoints(config)
        if not 0 <= index < len(endpoints):
            raise ValueError(f"reader index {index} is not in 0..{len(endpoints) - 1} "
                             f"(readers.count = {config.readers})")
        self.config = config
        self.index = index
        self.endpoint = endpoints[index]
        self.schema = schema if schema is not None else config.load_schema()
        self.shards = [ShardView(config, n, self.schema) for n in range(config.shards)]
        self.counters = ReaderCounters()
        self.stopping = False
        self.hangup = False
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.sock: zmq.Socket[bytes] | None = None

    def bind(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.SNDHWM, HWM)
        # A larger message makes ZeroMQ drop the connection before Python sees a byte of it.
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_SIZE + 1024)
        if self.endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(self.endpoint[6:]), mode=0o700, exist_ok=True)
        try:
            security.secure_server(sock, self.config, self.endpoint)
            sock.bind(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        self.sock = sock
        log.info("reader %d serving %d shards under %s on %s (pid %d)", self.index,
                 self.config.shards, self.config.data_dir, self.endpoint, os.getpid())

    # -- answering ----------------------------------------------------------------------------

    def answer(self, frame: bytes) -> bytes:
        """The reply to one request frame; never raises."""
        self.counters.requests += 1
        seq = 0
        try:
            code, _client_id, seq, body, _epoch, rv = protocol.unpack_request(frame)
            if code == PING.code:
                if body is not None:
                    raise ProtocolError("ping takes no body")
                return protocol.pack_reply(seq, 0, self.health())
            shard, cmd, args = self._validated(code, body)
        except Exception as exc:  # validation must never take the reader down
            return self._refused(seq, exc)
        return self._reply(seq, shard, cmd, args, rv)

    def _validated(self, code: int, body: Any) -> tuple[int, Command, Any]:
        """The shard, read command and its checked arguments of a ``read`` request."""
        if code != READ.code:
            name = protocol.BY_CODE[code].name if code in protocol.BY_CODE else code
            raise ProtocolError(
                f"the reader pool does not serve command {name!r:.20}; it serves "
                f"{', '.join(READ_COMMANDS)} (as command {READ.code}) and ping",
                hint="send writes, stats and shard pings to the shard owner")
        shard, cmd, inner = read_parts(body, MAX_SHARDS)
        if shard >= len(self.shards):
            self._grow(shard)
        return shard, cmd, cmd.validate(_tables(self.shards[shard].store()), inner)

    def _grow(self, shard: int) -> None:
        """A read for a shard beyond this reader's config: a re-shard added shards and wrote
        them into the config file; read it again and serve them too (ProtocolError when the
        file does not name ``shard`` either)."""
        config = self.config
        if config.path is not None:
            try:
                config = load_config(config.path)
            except Error as exc:
                log.warning("cannot read %s again for shard %d: %s", config.path, shard, exc)
        if shard >= config.shards:
            raise ProtocolError(f"shard must be an int from 0 to {config.shards - 1}, not "
                                f"{shard}", hint="the re-shard that adds it has not written "
                                "the config file yet")
        log.info("serving shards %d to %d too: the config file names %d shards now",
                 len(self.shards), config.shards - 1, config.shards)
        self.shards += [ShardView(config, n, self.schema)
                        for n in range(len(self.shards), config.shards)]
        self.config = config

    def _refused(self, seq: int, exc: Exception) -> bytes:
        """The error reply to a request that could not be read, checked or routed."""
        if isinstance(exc, ShardUnavailable):
            self.counters.errors += 1
            return protocol.pack_error(seq, exc)
        self.counters.bad_frames += 1
        if isinstance(exc, Error):
            return protocol.pack_error(seq, exc)
        return protocol.pack_error(
            seq, ProtocolError(f"invalid request: {type(exc).__name__}: {exc}"))

    def _reply(self, seq: int, shard: int, cmd: Command, args: Any, rv: int) -> bytes:
        """The reply to a checked read command routed by slot map version ``rv``: its body,
        or the error it ran into."""
        c = self.counters
        try:
            reply = protocol.pack_reply(seq, 0, _run(self.shards[shard], cmd, args, rv))
        except Error as exc:
            c.errors += 1
            return protocol.pack_error(seq, exc)
        except lmdb.BadValsizeError as exc:  # validation let through what LMDB cannot look up
            c.bad_frames += 1
            return protocol.pack_error(seq, ProtocolError(
                f"{cmd.name}: a key or index value LMDB cannot take ({exc})"))
        except Exception as exc:
            c.errors += 1
            log.exception("read command %s on shard %d failed", cmd.name, shard)
            return protocol.pack_error(seq, InternalError(f"{type(exc).__name__}: {exc}"))
        if len(reply) > protocol.MAX_FRAME_SIZE:
            c.errors += 1
            return protocol.pack_error(seq, LimitExceeded(
                f"the reply to {cmd.name} would be {len(reply):,} bytes, over the frame limit "
                f"of {protocol.MAX_FRAME_SIZE:,} bytes",
                hint="ask for fewer keys at once, or scan in pages"))
        return reply

    def serve_forever(self) -> None:
        """Answer requests until ``stopping`` is set (SIGTERM/SIGINT); then close. When
        ``hangup`` is set (SIGHUP), re-read the config and report it, between requests."""
        if self.sock is None:
            self.bind()
        sock = self.sock
        assert sock is not None
        for view in self.shards:  # open what exists now; the rest is retried on demand
            try:
                view.store()
            except Error:
                view.forget_failure()
        # A blocking receive with a timeout: no poll call per request, and the loop still
        # looks at ``stopping`` every POLL_MS. Frame by frame rather than recv_multipart and
        # send_multipart: half the Python work per request (docs/performance.md).
        sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
        recv, send, more, answer = sock.recv, sock.send, sock.get, self.answer
        RCVMORE, SNDMORE, NOBLOCK = zmq.RCVMORE, zmq.SNDMORE, zmq.NOBLOCK
        while not self.stopping:
            if self.hangup:
                self.hangup = False
                report_hangup(self.config, f"reader_{self.index:02d}", log)
            try:
                ident = recv()
            except zmq.Again:
                continue
            # A message arrives whole, so its later frames are there at once (NOBLOCK).
            if not more(RCVMORE):  # a ROUTER prepends the identity: cannot happen
                self.counters.dropped += 1
                continue
            frame = recv(NOBLOCK)
            if more(RCVMORE):  # not one frame from a DEALER: not our framing, drop it
                while more(RCVMORE):
                    recv(NOBLOCK)
                self.counters.dropped += 1
                continue
            send(ident, SNDMORE)
            send(answer(frame))
        log.info("reader %d stopping after %d requests", self.index, self.counters.requests)
        self.close()

    def health(self) -> dict[str, Any]:
        """Index, pid, counters, and the txn id of every shard this reader can serve."""
        txn_ids = {}
        for view in self.shards:
            try:  # also opens a shard whose owner has created it since
                txn_ids[view.shard] = view.store().env.info()["last_txnid"]
            except Exception:  # a health reply must not fail
                pass
        return {"reader": self.index, "pid": os.getpid(), "endpoint": self.endpoint,
                "shards": self.config.shards, "txn_ids": txn_ids, **self.counters.as_dict()}

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping = True

        def hangup(signum: int, frame: Any) -> None:
            self.hangup = True  # the loop re-reads the config between requests

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hangup)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
        for view in self.shards:
            view.close()
        if self._own_ctx:
            zap.stop_authenticator(self.ctx)
            self.ctx.term()


def _tables(store: Store) -> TableMap:
    """The store's tables bound to its environment."""
    return store.tables


def _run(view: ShardView, cmd: Command, args: Any, rv: int) -> Any:
    """``cmd``'s reply body in a fresh read snapshot of ``view``'s store, under the slot state
    that snapshot sees (``read_guarded``): ``Store.read`` without its generator, a third of a
    get's cost on the reader."""
    store = view.store()
    try:
        txn = store.env.begin()
    except lmdb.MapResizedError:  # the owner grew the map: Store.read adopts the new size
        with store.read() as r:
            return read_guarded(view.guard(r.txn), cmd, args, rv, r)
    try:
        return read_guarded(view.guard(txn), cmd, args, rv, ReadTxn(txn, _tables(store)))
    finally:
        txn.abort()


def pin_to_cpu(index: int) -> int | None:
    """Keep the calling thread, and every thread it starts from now on, on one CPU: the
    ``index``-th (modulo) of those it may run on. The CPU, or None where the OS cannot pin.
    Call it before the ZeroMQ context exists: its I/O thread inherits the mask, so the hand-off
    between it and the reader's thread, twice per request, stays on one core instead of waking
    a thread on another (docs/performance.md)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index", type=int, default=0, metavar="I",
        help="this reader's number, 0 .. readers.count - 1 (supervisord passes "
        "%%(process_num)d); reader I binds readers.endpoint's port + I")
    parser.add_argument(
        "--pin-cpu", action="store_true",
        help="keep reader I and its ZeroMQ I/O thread on one CPU (the I-th it may use, "
        "modulo): fewer cross-core wakeups per request; best when the readers' CPUs are not "
        "busy with other work")


def run(config: Config, args: argparse.Namespace) -> int:
    """Entry point of ``lmshardd readers``: serve until told to stop; the exit status."""
    index = args.index
    if config.readers < 1:
        log.error("readers.count is 0 in %s: the reader pool is switched off", config.path)
        return 2
    if not 0 <= index < config.readers:
        log.error("--index %d is not in 0..%d (readers.count in %s)", index,
                  config.readers - 1, config.path)
        return 2
    if getattr(args, "pin_cpu", False):
        cpu = pin_to_cpu(index)
        if cpu is None:
            log.warning("reader %d: --pin-cpu is not supported on this platform: ignored", index)
        else:
            log.info("reader %d pinned to CPU %d", index, cpu)
    try:
        reader = Reader(config, index)
    except Error as exc:
        log.error("reader %d cannot start: %s", index, exc)
        return 2
    try:
        reader.bind()
    except (Error, zmq.ZMQError) as exc:
        log.error("reader %d cannot serve %s: %s", index, reader.endpoint, exc)
        reader.close()
        return 2
    reader.install_signal_handlers()
    reader.serve_forever()
    return 0
