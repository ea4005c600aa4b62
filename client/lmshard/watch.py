"""Watching the change log: ``client.watch()`` over a running service, ``store.watch()`` over an
embedded store's own log.

A ``Watch`` is an iterator of ``Change``s and a context manager. Per shard, changes come in
commit order, each committed change once; across shards there is no common order (as with the
partitions of a Kafka topic). ``Watch.cursor`` is the position after the last change returned,
one per shard, as a string: store it (in the same store, say) and pass it back as ``since``,
and the new watch carries on with the change after it, missing nothing and repeating nothing.
A cursor older than the log's retention gets ``ChangesCompacted``, which names the oldest
cursor still available.

The service's watch talks to each owner's change-feed socket (``lmshard.changes_wire``) with
credit-based flow control: the owner sends only as much as the watch has room for, so a watch
that is not read falls behind and catches up from the log later. When an owner goes away (a
crash, a restart, a lost connection) the watch notices the silence and starts again from its
position on a new connection: nothing is missed or repeated.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from lmshard import security
from lmshard.changes import (
    Position,
    filter_effects,
    format_cursor,
    parse_cursor,
    record_effects,
)
from lmshard.changes_wire import (
    CANCEL,
    CHANGES,
    COMPACTED,
    CREDIT,
    ERROR,
    PROGRESS,
    STARTED,
    WATCH,
    decode,
    pack,
)
from lmshard.errors import (
    ChangesCompacted,
    Error,
    InvalidCursor,
    ProtocolError,
    ShardUnavailable,
    TransactionError,
    error_from_wire,
)
from lmshard.map_growth import begin_read

if TYPE_CHECKING:
    from lmshard.store import Store

CREDIT_WINDOW = 64
"""Messages (one committed transaction's changes each) a watch lets an owner send ahead."""
SILENCE = 3.0
"""Seconds without a word from an owner (it sends a heartbeat every second) after which the
watch reconnects and starts again from its position."""
POLL_MIN, POLL_MAX = 0.001, 0.02
"""The embedded store's watch looks for new records this often (backing off while idle)."""


class Change:
    """One committed change: ``op`` is ``"put"`` (``value`` the new value) or ``"delete"``
    (``value`` None); ``cursor`` is the watch's position right after this change."""

    __slots__ = ("table", "key", "value", "op", "shard", "txn_id", "_positions")

    def __init__(self, table: str, key: Any, value: Any, shard: int, txn_id: int,
                 positions: tuple[Position, ...]) -> None:
        self.table = table
        self.key = key
        self.value = value
        self.op = "delete" if value is None else "put"
        self.shard = shard
        self.txn_id = txn_id
        self._positions = positions

    @property
    def cursor(self) -> str:
        """The position after this change, to pass as ``since`` to a later watch."""
        return format_cursor(self._positions)

    def __repr__(self) -> str:
        return (f"Change({self.op} {self.table} {self.key!r} -> {self.value!r:.60}, "
                f"shard={self.shard}, txn_id={self.txn_id})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Change):
            return NotImplemented
        return (self.table, self.key, self.value, self.shard, self.txn_id) == (
            other.table, other.key, other.value, other.shard, other.txn_id)

    __hash__ = None  # type: ignore[assignment]


class _Decoder:
    """Turns logged bytes into a Change's table name, key and value, with the schema's codecs
    (a table unknown to this schema keeps its id and raw bytes)."""

    def __init__(self, tables: Any) -> None:
        self.by_tid = {b.tid: (b.name, b.kdec, b.loads) for b in tables}

    def __call__(self, tid: bytes, kb: bytes, vb: bytes | None) -> tuple[str, Any, Any]:
        known = self.by_tid.get(tid)
        if known is None:
            import uuid
            return str(uuid.UUID(bytes=tid)), kb, vb
        name, kdec, loads = known
        return name, kdec(kb), None if vb is None else loads(vb)


Item = tuple[int, tuple[str, Any, Any, int] | None, Position]
"""A queued change (or a bare position update): (shard, (table, key, value, txn), position
after it)."""


class Watch:
    """What both watches share: the queue of received changes, the positions, the API."""

    def __init__(self, positions: list[Position | None], decode: _Decoder) -> None:
        self._positions = positions
        self._decode = decode
        self._queue: deque[Item] = deque()
        self._closed = False
        self._failed: Error | None = None

    # -- the API ---------------------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The position after the last change returned (a string; pass it as ``since``)."""
        return format_cursor(self._resolved())

    def get(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` seconds (None: as long as it takes);
        None when none came in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._queue:
                shard, change, after = self._queue.popleft()
                self._positions[shard] = after
                if change is not None:
                    table, key, value, txn = change
                    return Change(table, key, value, shard, txn, self._resolved())
            if self._closed:
                raise TransactionError("this watch is closed", hint="start a new watch")
            if self._failed is not None:
                raise self._failed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                self._fill(left)
            except Error as exc:
                self._failed = exc
                raise

    def __iter__(self) -> Iterator[Change]:
        while True:
            change = self.get()
            if change is not None:
                yield change

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching; ``cursor`` stays readable."""
        self._closed = True

    def receive(self) -> None:
        """Queue what has arrived, without waiting (``get(timeout=0)`` then returns it): for
        a caller that waits in its own way, as the async client's watch does."""
        if self._closed or self._failed is not None:
            return  # get() says so
        try:
            self._fill(0)
        except Error as exc:
            self._failed = exc

    # -- for the two kinds -----------------------------------------------------------------------

    def _fill(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for changes and queue them."""
        raise NotImplementedError

    def _resolved(self) -> tuple[Position, ...]:
        if any(p is None for p in self._positions):
            raise TransactionError("the watch has not started on every shard yet")
        return tuple(self._positions)  # type: ignore[arg-type]

    def _queue_record(self, shard: int, history: str, txn: int, effects: list[Any],
                      indexes: list[int] | None) -> None:
        decode, put = self._decode, self._queue.append
        for i, (tid, kb, vb) in enumerate(effects):
            n = indexes[i] if indexes is not None else i
            table, key, value = decode(tid, kb, vb)
            put((shard, (table, key, value, txn), Position(history, txn, n + 1)))
        put((shard, None, Position(history, txn + 1, 0)))


def _since(since: Any, shards: int) -> list[Position] | str:
    if since is None or since == "now":
        return "now"
    if since == "start":
        return "start"
    return parse_cursor(since, shards)


# -- the embedded store's watch ----------------------------------------------------------------


class StoreWatch(Watch):
    """``Store.watch()``: follows the store's own log (also from another process that opened
    the store read-only), looking for new records every few milliseconds."""

    def __init__(self, store: Store, tables: frozenset[bytes] | None, prefix: bytes | None,
                 since: Any) -> None:
        super().__init__([None], _Decoder(store.tables.values()))
        self._store = store
        self._tables = tables
        self._prefix = prefix
        self._sleep = POLL_MIN
        log = store.changes
        if log is None or log.db is None:
            raise ChangesCompacted(f"the store at {store.path} keeps no change log",
                                   hint="open it with changes=True (by the process that "
                                   "writes it)")
        with self._read() as txn:
            log.refresh(txn)
            wanted = _since(since, 1)
            start = log.resolve(wanted if isinstance(wanted, str) else wanted[0],
                                int(txn.id()))
        self._positions[0] = start
        self._pos = start

    def _read(self) -> Any:
        return begin_read(self._store.env)

    def _fill(self, timeout: float | None) -> None:
        log = self._store.changes
        assert log is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._read() as txn:
                log.refresh(txn)
                pos = self._pos
                log.resolve(pos, int(txn.id()))  # ChangesCompacted once trimmed past it
                records = log.read(txn, pos.txn)
                last = int(txn.id())
            for txn_id, record in records:
                first = pos.n if txn_id == pos.txn else 0
                idx, picked = filter_effects(record_effects(record), first, self._tables,
                                             self._prefix)
                self._queue_record(0, pos.history, txn_id, picked, idx)
            # read() stops at its limits: after records, go on from the last one read (the
            # next round finds the rest, or nothing and moves to the end)
            end = records[-1][0] + 1 if records else last + 1
            moved = Position(pos.history, max(end, pos.txn), 0)
            if moved != pos:
                self._pos = moved
                self._queue.append((0, None, moved))
            if self._queue:
                self._sleep = POLL_MIN
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            time.sleep(self._sleep if left is None else min(self._sleep, left))
            self._sleep = min(self._sleep * 2, POLL_MAX)


def watch_filter(tables: Any, table: Any, prefix: Any) -> tuple[list[bytes] | None,
                                                                 bytes | None]:
    """The table ids and encoded key prefix a watch of ``table`` (None: all) and ``prefix``
    (as in ``scan``) asks for."""
    if table is None:
        if prefix is not None:
            raise TransactionError("a watch with a prefix needs a table",
                                   hint="pass the table whose keys the prefix is of")
        return None, None
    b = tables[table]
    return [b.tid], None if prefix is None else bytes(b.kprefix(prefix))


# -- the service's watch -----------------------------------------------------------------------


class _Feed:
    """The watch's connection to one owner's change feed."""

    __slots__ = ("shard", "endpoint", "sock", "wid", "seq", "granted", "received", "pos",
                 "started", "heard")

    def __init__(self, shard: int, endpoint: str) -> None:
        self.shard = shard
        self.endpoint = endpoint
        self.sock: zmq.Socket[bytes] | None = None
        self.wid = 0
        self.seq = 0
        self.granted = 0
        self.received = 0
        self.pos: Position | str = "now"
        self.started = False
        self.heard = 0.0


class ServiceWatch(Watch):
    """``Client.watch()``: one change-feed connection per shard owner."""

    def __init__(self, config: Any, tables: Any, table_ids: list[bytes] | None,
                 prefix: bytes | None, since: Any, timeout: float, *, wait: bool = True
                 ) -> None:
        shards = config.shards
        wanted = _since(since, shards)
        super().__init__([None] * shards if isinstance(wanted, str) else list(wanted),
                         _Decoder(tables))
        self._config = config
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._table_ids = table_ids
        self._prefix = prefix
        self._poller = zmq.Poller()
        self._feeds = [_Feed(s, config.changes_endpoint(s)) for s in range(shards)]
        if config.replica_names:  # a failover may have moved a shard: watch its primary
            for f in self._feeds:
                self._locate(f)
        self._starting = isinstance(wanted, str)
        for f in self._feeds:
            f.pos = wanted if isinstance(wanted, str) else wanted[f.shard]
            self._subscribe(f)
        if isinstance(wanted, str) and wait:  # "now" / "start": until each owner says where
            self._wait_started(timeout)

    @property
    def started(self) -> bool:
        """Whether every owner said where the watch starts (``cursor`` is known)."""
        return all(p is not None for p in self._positions)

    def sockets(self) -> list[zmq.Socket[bytes]]:
        """The change-feed sockets, to wait on before ``receive``; a restart replaces them."""
        return [f.sock for f in self._feeds if f.sock is not None]

    def not_started(self, timeout: float) -> ShardUnavailable:
        """Close the watch; the error for the owners that did not say where it starts within
        ``timeout`` seconds."""
        missing = [f.shard for f in self._feeds if not f.started]
        self.close()
        return ShardUnavailable(
            f"shards {missing} did not answer the watch within {timeout:.1f} s",
            hint="check that their owners run (lmshard status)")

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(f.started for f in self._feeds):
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.not_started(timeout)
            # Not _fill: it waits for a change, and a STARTED is none (nor is a change one
            # owner sent before the others answered a reason to stop reading them).
            try:
                ready = dict(self._poller.poll(int(min(left, SILENCE / 3) * 1000) + 1))
                for f in self._feeds:
                    if f.sock is not None and f.sock in ready:
                        self._drain(f)
            except Error:
                self.close()
                raise
        self._starting = False

    # -- connections -----------------------------------------------------------------------------

    def _locate(self, f: _Feed) -> None:
        """Point ``f`` at the change feed of the copy of its shard that is primary now (ask
        every copy: ``lmshard.copies``); left as it is when none says it is."""
        from lmshard.copies import ping_copies, primary_of

        best = primary_of(ping_copies(self._config, f.shard, ctx=self._ctx))
        if best is not None:
            f.endpoint = self._config.member(f.shard, best.member).changes_endpoint

    def _subscribe(self, f: _Feed) -> None:
        """(Re)start the watch on shard ``f.shard`` from ``f.pos`` on a new connection: what the
        old one still had in flight is dropped with it."""
        if f.sock is not None:
            self._poller.unregister(f.sock)
            f.sock.close(linger=0)
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, self._config, f.endpoint)
        sock.connect(f.endpoint)
        f.sock = sock
        self._poller.register(sock, zmq.POLLIN)
        f.wid = f.wid % 2_000_000_000 + 1
        f.seq = 0
        f.granted = CREDIT_WINDOW
        f.received = 0
        f.heard = time.monotonic()
        pos = f.pos
        if pos == "now":
            history, txn, n = "", None, 0
        elif pos == "start":
            history, txn, n = "", 0, 0
        else:
            assert isinstance(pos, Position)
            history, txn, n = pos.history, pos.txn, pos.n
        sock.send(pack(WATCH, f.wid, history, txn, n, self._table_ids, self._prefix,
                       CREDIT_WINDOW))

    def _fill(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # while starting, until every feed has started: changes queued from one owner must
        # not keep the start-up wait from reading another's STARTED
        while not self._queue or (self._starting
                                  and not all(f.started for f in self._feeds)):
            wait = SILENCE / 3
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            ready = dict(self._poller.poll(max(0, int(wait * 1000))))
            for f in self._feeds:
                if f.sock is not None and f.sock in ready:
                    self._drain(f)
            now = time.monotonic()
            for f in self._feeds:
                if now - f.heard > SILENCE:  # the owner went away, or the connection did
                    if self._config.replica_names:
                        self._locate(f)  # perhaps to another copy, after a failover
                    self._subscribe(f)
            if deadline is not None and now >= deadline:
                return

    def _drain(self, f: _Feed) -> None:
        sock = f.sock
        assert sock is not None
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(frames, "owner", limit=None)
            except ProtocolError:
                continue  # not from an owner of this version: ignore it
            if msg.watch_id == 0 and msg.message is ERROR:  # the owner could not read a frame
                code, message, hint = msg.values
                raise error_from_wire(code, f"shard {f.shard}: {message}", hint)
            if msg.watch_id != f.wid:
                continue  # an answer to an earlier start on this connection
            f.heard = time.monotonic()
            self._handle(f, msg.message, msg.values, msg.data)
            if sock is not f.sock:
                return  # restarted on a new connection
        if f.received >= CREDIT_WINDOW // 2 and f.sock is sock:
            sock.send(pack(CREDIT, f.wid, f.received))
            f.granted += f.received
            f.received = 0

    def _handle(self, f: _Feed, m: Any, values: list[Any], data: bytes | None) -> None:
        if m is STARTED:
            history, txn, n = values
            f.pos = Position(history, txn, n)
            f.started = True
            if self._positions[f.shard] is None:
                self._positions[f.shard] = f.pos
            return
        if m is COMPACTED:
            history, txn, message = values
            oldest = list(self._positions)
            oldest[f.shard] = Position(history, txn)
            cursor = (format_cursor(oldest)  # type: ignore[arg-type]
                      if all(p is not None for p in oldest) else None)
            raise ChangesCompacted(message, oldest=cursor, shard=f.shard)
        if m is ERROR:
            code, message, hint = values
            err = error_from_wire(code, message, hint)
            if type(err) is ProtocolError and f.started:
                self._subscribe(f)  # e.g. the owner restarted and no longer knows the watch
                return
            raise err
        seq = values[0]
        f.granted -= 1
        f.received += 1
        if seq != f.seq + 1 or not isinstance(f.pos, Position):
            self._subscribe(f)  # a gap: start again from what was received in order
            return
        f.seq = seq
        history = f.pos.history
        if m is CHANGES:
            txn, indexes = values[1], values[2]
            assert data is not None
            effects = msgpack.unpackb(data, raw=False, use_list=True)
            self._queue_record(f.shard, history, txn, effects, indexes)
            f.pos = Position(history, txn + 1, 0)
        elif m is PROGRESS:
            txn = values[1]
            if txn > f.pos.txn:
                f.pos = Position(history, txn, 0)
                self._queue.append((f.shard, None, f.pos))

    def close(self) -> None:
        if not self._closed:
            for f in self._feeds:
                if f.sock is not None:
                    try:
                        f.sock.send(pack(CANCEL, f.wid), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    f.sock.close(linger=0)
                    f.sock = None
        super().close()


__all__ = ["Change", "ChangesCompacted", "InvalidCursor", "ServiceWatch", "StoreWatch", "Watch",
           "watch_filter"]
