"""The client services import: routes writes to shard owners, reads shards in-process.

``lmshard.connect(config)`` returns a ``Client`` with the embedded store's data API. Writes are
encoded here, routed by the slot map to the owning shard, and sent over a DEALER socket; each
batch carries (client id, sequence number) so a retry after a timeout (Lazy Pirate: close the
socket, reconnect, resend the same sequence number) is applied once. Reads on the same host open
each shard's environment read-only, once per process; elsewhere they go over the wire.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

import lmdb
import zmq

from lmshard import protocol, security
from lmshard.config import SUPERVISOR_SOCKET, Config, load_config
from lmshard.errors import (
    BatchPartiallyApplied,
    ConflictError,
    Error,
    ShardUnavailable,
    TransactionError,
    UnknownTable,
    error_from_wire,
)
from lmshard.keys import encode_index_value
from lmshard.remote import READ_CODES, ReaderPool
from lmshard.schema import Schema, Table
from lmshard.store import Store
from lmshard.txn import filtered_rows, index_prefix, key_bounds, value_hash
from lmshard.writer import Writer

log = logging.getLogger("lmshard.client")

SCAN_PAGE = 1000
"""Rows per page when a scan goes over the wire."""
GET_MANY_CHUNK = 10_000
"""Keys per remote get_many request; the chunks of one call are sent at once."""
PROBE_MS = 50
"""A request to an ipc endpoint that has no reply after this long checks that the owner's
socket file exists; a missing file fails the request at once (ShardUnavailable) instead of
after timeout_ms x (retries + 1). Replies faster than this cost no check."""
PROBE_RECHECK_S = 0.01
"""A socket file found missing by that check is looked for once more after this long."""

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _file_missing(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # e.g. no permission to look: let the request find out
    return False


def _after_fork_in_child() -> None:
    # ZeroMQ contexts and sockets must not cross fork(); the child builds its own on first use.
    for client in list(_clients):
        client._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ClientTable:
    """A table as the client routes it: encoders, decoders and how a key picks its shard."""

    __slots__ = ("table", "name", "tid", "kenc", "kdec", "kprefix", "dumps", "loads", "pinned",
                 "shard_key", "shard_prefix", "local")

    def __init__(self, table: Table, shard_of: Callable[[bytes], int], shards: int) -> None:
        self.table = table
        self.name = table.name
        self.tid = table.table_id.bytes
        self.kenc = table.key.encode
        self.kdec = table.key.decode
        self.kprefix = table.key.encode_prefix
        self.dumps = table.value.dumps
        self.loads = table.value.loads
        self.pinned: int | None = shard_of(self.tid) if table.pinned else None
        self.shard_key = table.shard_key
        self.shard_prefix = table.shard_prefix
        self.local: list[tuple[Any, Any] | None] = [None] * shards
        """Per shard, (environment, database) of this table once the shard is open here: the
        point get's fast path. Cleared after fork and on close."""


class _Conn:
    """One thread's DEALER socket to one shard owner, with its own sequence numbers."""

    __slots__ = ("sock", "seq", "gone")

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.seq = 0
        self.gone = False
        """The owner's socket file was missing when the last request failed: the next request
        checks for it before sending anything."""


class _Counters:
    """The client's counters, one dict per thread (``d[k] += 1`` from two threads at once can
    lose a count); ``total()`` adds them up. Dicts of finished threads are folded into one."""

    NAMES = ("batches_sent", "ops_sent", "retries", "timeouts", "remote_reads", "batches_failed",
             "unavailable")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._live: list[tuple[weakref.ref[threading.Thread], dict[str, int]]] = []
        self._done: dict[str, int] = dict.fromkeys(self.NAMES, 0)

    def mine(self) -> dict[str, int]:
        d: dict[str, int] | None = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = dict.fromkeys(self.NAMES, 0)
            with self._lock:
                self._fold()
                self._live.append((weakref.ref(threading.current_thread()), d))
        return d

    def _fold(self) -> None:
        keep = []
        for ref, d in self._live:
            thread = ref()
            if thread is None or not thread.is_alive():
                for k, v in d.items():
                    self._done[k] += v
            else:
                keep.append((ref, d))
        self._live = keep

    def total(self) -> dict[str, int]:
        with self._lock:
            self._fold()
            out = dict(self._done)
            for _, d in self._live:
                for k, v in d.items():
                    out[k] += v
        return out


class Batch:
    """Writes collected by ``Client.batch()`` and sent, one message per shard, on exit.

    Bad keys and values raise at the call, before anything is sent. After the block,
    ``results`` holds each op's result in call order and ``txn_ids`` each shard's txn id.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._parts: dict[int, list[list[Any]]] = {}
        self._order: list[tuple[int, int]] = []
        self.results: list[Any] = []
        self.txn_ids: dict[int, int] = {}

    def _add(self, table: Any, key: Any, op: int, arg: Any) -> None:
        ct = self._client._table(table)
        kb = ct.kenc(key)
        shard = self._client._route(ct, key, kb)
        part = self._parts.setdefault(shard, [])
        self._order.append((shard, len(part)))
        part.append([op, ct.tid, kb, arg])

    def put(self, table: Any, key: Any, value: Any) -> None:
        # The hot path of batched writes: _add inlined.
        client = self._client
        ct = client._tables.get(table) or client._table(table)
        kb = ct.kenc(key)
        vb = ct.dumps(value)
        if ct.pinned is not None:
            shard = ct.pinned
        elif ct.shard_key is None:
            shard = client._shard_of(kb)
        else:
            shard = client._route(ct, key, kb)
        part = self._parts.get(shard)
        if part is None:
            part = self._parts[shard] = []
        self._order.append((shard, len(part)))
        part.append([protocol.OP_PUT, ct.tid, kb, vb])

    def delete(self, table: Any, key: Any) -> None:
        self._add(table, key, protocol.OP_DELETE, None)

    def incr(self, table: Any, key: Any, delta: int = 1) -> None:
        if type(delta) is not int:
            raise TransactionError(f"incr delta must be an int, not {type(delta).__name__}")
        self._add(table, key, protocol.OP_INCR, delta)

    def cas(self, table: Any, key: Any, value: Any, expected: Any = None, *,
            expected_hash: bytes | None = None) -> None:
        """Put ``value`` if the row holds ``expected`` (None: absent); a mismatch fails this
        shard's part of the batch with ConflictError."""
        ct = self._client._table(table)
        if expected_hash is not None:
            exp = [ct.dumps(value), protocol.CAS_HASH, bytes(expected_hash)]
        elif expected is None:
            exp = [ct.dumps(value), protocol.CAS_ABSENT, None]
        else:
            exp = [ct.dumps(value), protocol.CAS_VALUE, ct.dumps(expected)]
        self._add(table, key, protocol.OP_CAS, exp)

    def __len__(self) -> int:
        return len(self._order)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._order:
            self._send()

    def _send(self) -> None:
        outcomes = self._client._write_parts(self._parts)
        committed = {s: o[1][0] for s, o in outcomes.items() if o[0] is None}
        failed = {s: o[0] for s, o in outcomes.items() if o[0] is not None}
        self.txn_ids = committed
        if failed:
            if not committed:
                raise next(iter(failed.values()))
            raise BatchPartiallyApplied(
                f"batch committed on shards {sorted(committed)} and failed on "
                f"{sorted(failed)}: " + "; ".join(f"shard {s}: {e}" for s, e in failed.items()),
                committed=committed, failed=failed,
            )
        self.results = [outcomes[s][1][1][i] for s, i in self._order]


class Client:
    """A connection to a running lmshard service; safe to share between threads."""

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | None = None,
        schema: Schema | None = None,
        *,
        timeout_ms: int | None = None,
        retries: int | None = None,
        local_reads: bool | None = None,
    ) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.schema = schema if schema is not None else self.config.load_schema()
        self.timeout_ms = self.config.timeout_ms if timeout_ms is None else timeout_ms
        self.retries = self.config.retries if retries is None else retries
        self.local_reads = self.config.local_reads if local_reads is None else local_reads
        self.schema.check_sharded(self.config.shards)
        self.slot_map = self.config.slot_map
        self.shards = self.config.shards
        self._shard_of = self.slot_map.shard_of
        self._ipc_paths: list[str | None] = [
            ep[len("ipc://"):] if ep.startswith("ipc:///") else None
            for ep in map(self.config.endpoint, range(self.shards))]
        """Per shard, the owner's socket file when its endpoint is ipc, else None."""
        self._supervisor_socket = os.fspath(self.config.run_dir / SUPERVISOR_SOCKET)
        self._tables: dict[Any, ClientTable] = {}
        for t in self.schema.tables.values():
            ct = ClientTable(t, self._shard_of, self.shards)
            self._tables[t] = self._tables[t.name] = self._tables[t.table_id] = ct
        self._stores: list[Store | None] = [None] * self.shards
        self._remote_only: set[int] = set()
        self._store_lock = threading.Lock()
        self._ctx: zmq.Context[Any] | None = None
        self._tls = threading.local()
        self._counts = _Counters()
        self._pool: ReaderPool | None = None
        self._writers: weakref.WeakSet[Writer] = weakref.WeakSet()
        self._closed = False
        _clients.add(self)

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def _counters(self) -> dict[str, int]:
        """This thread's counters (add to them here; read the sums with ``counters()``)."""
        return self._counts.mine()

    def counters(self) -> dict[str, int]:
        """What this client did in this process: batches_sent, ops_sent, retries, timeouts,
        remote_reads, batches_failed, unavailable (summed over its threads)."""
        return self._counts.total()

    def _forget_local_handles(self) -> None:
        for ct in set(self._tables.values()):
            ct.local = [None] * self.shards

    def _reset_after_fork(self) -> None:
        self._forget_local_handles()  # the child's stores reopen their environments
        self._counts = _Counters()  # the child counts its own work, with a lock of its own
        self._ctx = None
        self._tls = threading.local()
        self._store_lock = threading.Lock()

    def _table(self, table: Any) -> ClientTable:
        try:
            return self._tables[table]
        except KeyError:
            raise UnknownTable(
                f"no table {getattr(table, 'name', table)!r} in schema {self.schema.name!r}",
                hint=f"known tables: {', '.join(sorted(self.schema.tables))}",
            ) from None

    def _route(self, ct: ClientTable, key: Any, kb: bytes) -> int:
        if ct.pinned is not None:
            return ct.pinned
        if ct.shard_prefix is not None:
            return self._leading_shard(ct, key)
        if ct.shard_key is not None:
            return self._shard_of(encode_index_value(ct.shard_key(key)))
        return self._shard_of(kb)

    def _conns(self) -> dict[int, _Conn]:
        conns = getattr(self._tls, "conns", None)
        if conns is None:
            conns = self._tls.conns = {}
            self._tls.client_id = uuid.uuid4().bytes
        return conns

    def _conn(self, shard: int) -> _Conn:
        conns = self._conns()
        conn = conns.get(shard)
        if conn is None:
            conn = conns[shard] = _Conn(self._socket(shard))
        return conn

    def _socket(self, shard: int) -> zmq.Socket[bytes]:
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

    def _reconnect(self, shard: int, conn: _Conn) -> None:
        conn.sock.close(linger=0)
        conn.sock = self._socket(shard)

    def _request(self, shard: int, code: int, body: Any, *, write: bool) -> Any:
        """Send one request to one shard and wait for its reply, with Lazy Pirate retries.

        The one-shard case of ``_requests``, kept lean: it is every single put's path. The
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
        frame = protocol.pack_request(code, self._tls.client_id if write else None, seq, body)
        for attempt in range(self.retries + 1):
            sock = conn.sock
            try:
                sock.send(frame, zmq.NOBLOCK, len(frame) < protocol.ZERO_COPY_MIN)
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
                rseq, status, rbody = protocol.unpack_frame(reply)
                if rseq == seq:
                    return rbody if status == 0 else error_from_wire(status, *rbody)
                wait_ms = int((deadline - time.monotonic()) * 1000)  # a late, stale reply
            self._counters["timeouts"] += 1
            if attempt < self.retries:
                self._counters["retries"] += 1
                log.info("shard %d did not answer in %d ms: reconnecting, resending "
                         "sequence %d", shard, self.timeout_ms, seq)
            self._reconnect(shard, conn)
        raise self._unavailable(shard)

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
        self._counters["unavailable"] += 1
        endpoint = self.config.endpoint(shard)
        return ShardUnavailable(
            f"shard {shard} at {endpoint} is not running: its socket file "
            f"{self._ipc_paths[shard]} does not exist (failed at once, not after "
            f"{self.timeout_ms} ms x {self.retries + 1} attempts)",
            hint="start the service with `lmshard up`; `lmshard status` shows which shard "
                 "owners run",
        )

    def _unavailable(self, shard: int) -> ShardUnavailable:
        self._counters["unavailable"] += 1
        return ShardUnavailable(
            f"shard {shard} at {self.config.endpoint(shard)} did not answer within "
            f"{self.timeout_ms} ms, {self.retries + 1} attempts"
            + security.auth_hint(self.config, self.config.endpoint(shard)),
            hint="check that the shard owner runs: lmshard status; its log names the cause",
        )

    def _requests(self, parts: dict[int, tuple[int, Any]], *, write: bool,
                  silent_ok: bool = False) -> dict[int, Any]:
        """Send requests to several shards at once, wait for every reply.

        Returns shard -> result, or shard -> Error for a shard that answered with an error;
        a shard that stays silent through every retry raises ShardUnavailable (or, with
        ``silent_ok``, gets a ShardUnavailable as its result).
        """
        conns = {s: self._conn(s) for s in parts}
        gone: set[int] = set()  # owners whose socket file is missing: failed at once
        for s in parts:
            if conns[s].gone:  # not there last time: nothing is sent if it still is not
                if self._socket_missing(s):
                    gone.add(s)
                else:
                    conns[s].gone = False
        cid = self._tls.client_id if write else None
        frames: dict[int, bytes] = {}
        seqs: dict[int, int] = {}
        for s, (code, body) in parts.items():
            conn = conns[s]
            conn.seq += 1
            seqs[s] = conn.seq
            frames[s] = protocol.pack_request(code, cid, conn.seq, body)
        results: dict[int, Any] = {}
        pending = set(parts) - gone
        for attempt in range(self.retries + 1):
            if not pending:
                break
            for s in pending:
                try:
                    conns[s].sock.send(frames[s], zmq.NOBLOCK,
                                       len(frames[s]) < protocol.ZERO_COPY_MIN)
                except zmq.Again:
                    pass  # the queue to that peer is full: wait out the timeout, then retry
            now = time.monotonic()
            deadline = now + self.timeout_ms / 1000
            # After a short wait, a look for the socket file of each ipc owner still silent.
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
                    for s in sorted(pending):
                        if self._socket_missing(s, recheck=True):
                            pending.discard(s)
                            gone.add(s)
                            conns[s].gone = True
                            poller.unregister(conns[s].sock)
                            self._reconnect(s, conns[s])  # drops the queued request
                    continue
                left = (deadline if probe_at is None else min(deadline, probe_at)) - now
                if left <= 0:
                    break
                for sock, _ in poller.poll(max(1, int(left * 1000))):
                    s = by_sock[sock]
                    seq, status, body = protocol.unpack_frame(sock.recv())
                    if seq != seqs[s] or s not in pending:
                        continue  # a late answer to an earlier attempt
                    results[s] = body if status == 0 else error_from_wire(status, *body)
                    pending.discard(s)
                    poller.unregister(sock)
            if not pending:
                break
            self._counters["timeouts"] += len(pending)
            if attempt < self.retries:
                self._counters["retries"] += len(pending)
                for s in pending:
                    log.info("shard %d did not answer in %d ms: reconnecting, resending "
                             "sequence %d", s, self.timeout_ms, seqs[s])
                    self._reconnect(s, conns[s])
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

    def _write_parts(
        self, parts: dict[int, list[list[Any]]]
    ) -> dict[int, tuple[Error | None, Any]]:
        counters = self._counters
        counters["batches_sent"] += len(parts)
        counters["ops_sent"] += sum(len(p) for p in parts.values())
        replies = self._requests({s: (2, ops) for s, ops in parts.items()}, write=True)
        counters["batches_failed"] += sum(isinstance(r, Error) for r in replies.values())
        return {s: (r, None) if isinstance(r, Error) else (None, r) for s, r in replies.items()}

    def _write_one(self, table: Any, key: Any, op: int, arg: Any) -> Any:
        ct = self._table(table)
        kb = ct.kenc(key)
        shard = self._route(ct, key, kb)
        counters = self._counters
        counters["batches_sent"] += 1
        counters["ops_sent"] += 1
        r = self._request(shard, 2, [[op, ct.tid, kb, arg]], write=True)
        if isinstance(r, Error):
            counters["batches_failed"] += 1
            raise r
        return r[1][0]

    def _local(self, shard: int) -> Store | None:
        """The shard's environment opened read-only in this process, or None (remote reads)."""
        st = self._stores[shard]
        if st is not None or not self.local_reads or shard in self._remote_only:
            return st
        with self._store_lock:
            st = self._stores[shard]
            if st is None and shard not in self._remote_only:
                path = self.config.shard_dir(shard)
                try:
                    st = Store(path, self.schema, readonly=True,
                               max_readers=self.config.max_readers)
                except Error as exc:
                    log.warning("shard %d: reading through the owner, the files at %s cannot "
                                "be opened here: %s", shard, path, exc)
                    self._remote_only.add(shard)
                    return None
                self._stores[shard] = st
        return st

    # -- writes ------------------------------------------------------------------------------

    def put(self, table: Any, key: Any, value: Any) -> None:
        """One acked write: returns once the owner committed it."""
        self._write_one(table, key, protocol.OP_PUT, self._table(table).dumps(value))

    def delete(self, table: Any, key: Any) -> bool:
        return bool(self._write_one(table, key, protocol.OP_DELETE, None))

    def incr(self, table: Any, key: Any, delta: int = 1) -> int:
        """Atomically add ``delta`` on the owner; the new value."""
        if type(delta) is not int:
            raise TransactionError(f"incr delta must be an int, not {type(delta).__name__}")
        return int(self._write_one(table, key, protocol.OP_INCR, delta))

    def cas(self, table: Any, key: Any, value: Any, expected: Any = None, *,
            expected_hash: bytes | None = None) -> bool:
        """Put ``value`` only if the row holds ``expected`` (None: absent); False otherwise."""
        b = Batch(self)
        b.cas(table, key, value, expected, expected_hash=expected_hash)
        try:
            b._send()
        except ConflictError:
            return False
        return True

    def batch(self) -> Batch:
        """Collect writes; on exit each shard's part is sent as one message and applied
        atomically. A batch over several shards is atomic per shard, not across them."""
        return Batch(self)

    def writer(self, *, batch_size: int = 1000, window: int = 4) -> Writer:
        """Pipelined bulk writes: ops are buffered per shard, sent as batches of ``batch_size``,
        with up to ``window`` batches in flight per shard while the caller goes on. Batches of
        one shard are applied in the order sent, each atomically; ``flush()`` (or the end of a
        ``with`` block) waits for every ack. See ``lmshard.writer``."""
        w = Writer(self, batch_size=batch_size, window=window)
        self._writers.add(w)
        return w

    # -- reads -------------------------------------------------------------------------------

    def get(self, table: Any, key: Any, default: Any = None) -> Any:
        ct = self._tables.get(table) or self._table(table)
        kb = ct.kenc(key)
        shard = ct.pinned if ct.pinned is not None else (
            self._shard_of(kb) if ct.shard_key is None else self._route(ct, key, kb))
        hit = ct.local[shard]
        if hit is not None:  # the hot path: one read txn on this process's open environment
            try:
                txn = hit[0].begin(db=hit[1])
            except lmdb.MapResizedError:  # the owner grew the map: the store adopts it
                return self._stores[shard].get_encoded(  # type: ignore[union-attr]
                    ct.table, kb, default)
            data = txn.get(kb)
            txn.abort()
            return default if data is None else ct.loads(data)
        st = self._stores[shard] or self._local(shard)
        if st is not None:
            ct.local[shard] = (st.env, st._tables[ct.table].db)
            return st.get_encoded(ct.table, kb, default)
        data = self._remote(shard, 10, [ct.tid, kb])
        return default if data is None else ct.loads(data)

    def get_hash(self, table: Any, key: Any) -> bytes | None:
        """The stored value's hash, for ``cas(..., expected_hash=)``."""
        ct = self._table(table)
        kb = ct.kenc(key)
        shard = self._route(ct, key, kb)
        st = self._local(shard)
        if st is not None:
            with st.read() as r:
                data = r.get_raw(ct.table, kb)
        else:
            data = self._remote(shard, 10, [ct.tid, kb])
        return None if data is None else value_hash(data)

    def _reader_pool(self) -> ReaderPool | None:
        """The reader pool that serves this client's remote reads, or None when the service
        runs none (``readers.count = 0``): then the shard owners answer them."""
        if self._pool is None and self.config.readers > 0:
            with self._store_lock:
                if self._pool is None:
                    self._pool = ReaderPool(self.config, timeout_ms=self.timeout_ms,
                                            retries=self.retries)
        return self._pool

    def _remote(self, shard: int, code: int, body: Any) -> Any:
        self._counters["remote_reads"] += 1
        pool = self._reader_pool() if code in READ_CODES else None
        if pool is not None:
            return pool.request(shard, code, body)
        r = self._request(shard, code, body, write=False)
        if isinstance(r, Error):
            raise r
        return r

    def _remote_many(self, parts: list[tuple[int, int, Any]]) -> list[Any]:
        """Several remote reads, sent at once through the pool (or one owner at a time)."""
        pool = self._reader_pool()
        if pool is None:
            return [self._remote(*part) for part in parts]
        self._counters["remote_reads"] += len(parts)
        replies = pool.requests(parts)
        for r in replies:
            if isinstance(r, Error):
                raise r
        return replies

    def get_many(self, table: Any, keys: Any, default: Any = None) -> list[Any]:
        ct = self._table(table)
        keys = list(keys)
        out: list[Any] = [default] * len(keys)
        by_shard: dict[int, list[tuple[int, bytes]]] = {}
        for i, key in enumerate(keys):
            kb = ct.kenc(key)
            by_shard.setdefault(self._route(ct, key, kb), []).append((i, kb))
        remote: list[tuple[int, list[tuple[int, bytes]]]] = []
        for shard, items in by_shard.items():
            st = self._local(shard)
            if st is not None:
                with st.read() as r:
                    for i, kb in items:
                        data = r.get_raw(ct.table, kb)
                        if data is not None:
                            out[i] = ct.loads(data)
            else:
                for c in range(0, len(items), GET_MANY_CHUNK):
                    remote.append((shard, items[c:c + GET_MANY_CHUNK]))
        if remote:
            replies = self._remote_many(
                [(shard, 11, [ct.tid, [kb for _, kb in items]]) for shard, items in remote])
            for (_, items), datas in zip(remote, replies, strict=True):
                for (i, _), data in zip(items, datas, strict=True):
                    if data is not None:
                        out[i] = ct.loads(data)
        return out

    def exists(self, table: Any, key: Any) -> bool:
        marker = object()
        return self.get(table, key, marker) is not marker

    def _bounds(self, ct: ClientTable, prefix: Any, start: Any, end: Any
                ) -> tuple[bytes | None, bytes | None]:
        return key_bounds(ct, prefix, start, end)

    def _leading_shard(self, ct: ClientTable, elements: Any) -> int:
        """The shard of a ``shard_key=n`` table's rows whose key starts with ``elements``
        (n or more of them): the first n, hashed as they are encoded in the key."""
        return self._shard_of(ct.kprefix(tuple(elements[:ct.shard_prefix])))

    def _shards_for(self, ct: ClientTable, prefix: Any = None) -> list[int]:
        """The shards rows of ``ct`` (under ``prefix``) can be on."""
        if ct.pinned is not None:
            return [ct.pinned]
        n = ct.shard_prefix
        if n is not None and prefix is not None:
            p = prefix if isinstance(prefix, (tuple, list)) else (prefix,)
            if len(p) >= n:  # every row under the prefix has these leading elements
                return [self._leading_shard(ct, p)]
        return list(range(self.shards))

    def _raw_range(self, shard: int, ct: ClientTable, lo: bytes | None, hi: bytes | None,
                   reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        st = self._local(shard)
        if st is not None:
            with st.read() as r:
                yield from r.scan_raw(ct.table, lo, hi, reverse)
            return
        pool = self._reader_pool()
        if pool is not None:
            self._counters["remote_reads"] += 1
            yield from pool.scan(shard, ct.tid, lo, hi, reverse, SCAN_PAGE)
            return
        while True:
            items, more = self._remote(shard, 12, [ct.tid, lo, hi, reverse, SCAN_PAGE])
            yield from ((k, v) for k, v in items)
            if not more or not items:
                return
            bounds = protocol.next_page(items[-1][0], lo, hi, reverse)
            if bounds is None:
                return
            lo, hi = bounds

    def scan(self, table: Any, prefix: Any = None, start: Any = None, end: Any = None,
             reverse: bool = False, limit: int | None = None,
             where: Callable[[Any], bool] | None = None) -> Iterator[tuple[Any, Any]]:
        """Yield (key, value) in key order across every shard (merged); ``end`` exclusive."""
        ct = self._table(table)
        lo, hi = self._bounds(ct, prefix, start, end)
        streams = [self._raw_range(s, ct, lo, hi, reverse)
                   for s in self._shards_for(ct, prefix)]
        merged = streams[0] if len(streams) == 1 else heapq.merge(
            *streams, key=itemgetter(0), reverse=reverse)
        yield from filtered_rows(merged, ct.kdec, ct.loads, where, limit)

    def count(self, table: Any, prefix: Any = None, start: Any = None, end: Any = None) -> int:
        ct = self._table(table)
        lo, hi = self._bounds(ct, prefix, start, end)
        total = 0
        remote = []
        for shard in self._shards_for(ct, prefix):
            st = self._local(shard)
            if st is not None:
                with st.read() as r:
                    if lo is None and hi is None:
                        total += r.count(ct.table)
                    else:
                        total += sum(1 for _ in r.scan_raw(ct.table, lo, hi))
            else:
                remote.append((shard, 14, [ct.tid, lo, hi]))
        return total + sum(int(n) for n in self._remote_many(remote))

    def lookup(self, table: Any, index: str, value: Any, prefix: bool = False
               ) -> list[tuple[Any, Any]]:
        """Rows by index value, from every shard the table lives on, in key order."""
        ct = self._table(table)
        if index not in ct.table.indexes:
            from lmshard.errors import UnknownIndex

            raise UnknownIndex(f"table {ct.name!r} has no index {index!r}",
                               hint=f"its indexes: {', '.join(ct.table.indexes) or '(none)'}")
        if value is None:
            return []
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        rows: list[tuple[bytes, bytes]] = []
        remote = []
        for shard in self._shards_for(ct):
            st = self._local(shard)
            if st is not None:
                with st.read() as r:
                    for rk in r.lookup_keys_raw(ct.table, index, ivb, prefix):
                        data = r.get_raw(ct.table, rk)
                        if data is not None:
                            rows.append((rk, data))
            else:
                remote.append((shard, 13, [ct.tid, index, ivb, prefix]))
        for found in self._remote_many(remote):
            rows.extend((k, v) for k, v in found)
        rows.sort(key=itemgetter(0))
        return [(ct.kdec(k), ct.loads(v)) for k, v in rows]

    def ping(self, shard: int) -> dict[str, Any]:
        """The owner's health; raises ShardUnavailable when it does not answer."""
        t = time.perf_counter()
        r = self._remote(shard, 1, None)
        r["rtt_ms"] = (time.perf_counter() - t) * 1000
        return r

    def stats(self) -> dict[str, Any]:
        """Every shard's statistics (as its owner reports them) and this client's counters."""
        replies = self._requests({s: (20, None) for s in range(self.shards)}, write=False,
                                 silent_ok=True)  # all at once: a dead shard costs one timeout
        shards = {s: {"error": str(r)} if isinstance(r, Error) else r
                  for s, r in sorted(replies.items())}
        return {"shards": shards, "client": self.counters()}

    def close(self) -> None:
        self._closed = True
        for w in list(self._writers):  # their sockets belong to this client's context
            w.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._forget_local_handles()
        for st in self._stores:
            if st is not None:
                st.close()
        self._stores = [None] * self.shards
        conns = getattr(self._tls, "conns", None) or {}
        for conn in conns.values():
            conn.sock.close(linger=0)
        self._tls = threading.local()
        if self._ctx is not None:
            self._ctx.term() if not conns else self._ctx.destroy(linger=0)
            self._ctx = None
        _clients.discard(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: Config | str | os.PathLike[str] | None = None, schema: Schema | None = None,
            **options: Any) -> Client:
    """Connect to a running service described by ``config`` (a Config, a path, or None for
    $LMSHARD_CONFIG / config/lmshard.toml). Options: timeout_ms, retries, local_reads."""
    return Client(config, schema, **options)

