"""The client services import: routes writes to shard owners, reads shards in-process.

``lmshard.connect(config)`` returns a ``Client`` with the embedded store's data API
(``lmshard.api.DataAPI``). Writes are encoded here, routed by the table's route
(``lmshard.routing.TableRoute``) to the owning shard, and sent over the owner connections
(``lmshard.connections``: Lazy Pirate retries, applied once per client id and sequence number).
Reads on the same host open each shard's environment read-only, once per process; elsewhere
they go over the wire (``lmshard.reads``). ``batch()`` and ``writer()`` group writes
(``lmshard.batch``, ``lmshard.writer``).
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lmshard import calls
from lmshard.batch import Batch, PartOutcome
from lmshard.bound_tables import live_row
from lmshard.client_tables import ClientTable
from lmshard.config import Config
from lmshard.connections import OwnerConnections
from lmshard.errors import ConflictError, Error, SlotMoved, TransactionError
from lmshard.forksafe import check_fork
from lmshard.point_get import SLOTS_CHANGED, routed_get, unique_lookup
from lmshard.protocol import (
    GET,
    OP_DELETE,
    OP_INCR,
    OP_PERSIST,
    OP_PUT,
    PING,
    STATS,
    WRITE,
    incr_delta,
)
from lmshard.reads import NOT_HERE, RemoteReads
from lmshard.schema import Schema
from lmshard.slot_routes import follow_moved
from lmshard.txn import TableRef, key_bounds, seconds_left, value_hash
from lmshard.watch import ServiceWatch, watch_filter
from lmshard.writer import Writer

if TYPE_CHECKING:
    from lmshard.api import DataAPI



class Client(calls.ClientCore[OwnerConnections]):
    """A connection to a running lmshard service; safe to share between threads."""

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | None = None,
        schema: Schema | None = None,
        *,
        timeout_ms: int | None = None,
        retries: int | None = None,
        local_reads: bool | None = None,
        breaker_ms: int | None = None,
    ) -> None:
        super().__init__(OwnerConnections, config, schema, timeout_ms=timeout_ms,
                         retries=retries, local_reads=local_reads, breaker_ms=breaker_ms)
        self._remote = RemoteReads(self.config, self.owners)
        self._writers: weakref.WeakSet[Writer] = weakref.WeakSet()

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def client_id(self) -> bytes:
        """This thread's client id, which the owners record with the writes they apply."""
        return self.owners.client_id

    def reset_after_fork(self) -> None:
        """In a forked child: drop what must not cross fork(); everything reopens on use."""
        super().reset_after_fork()
        self._remote.reset_after_fork()

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Calls of this thread inside the block fail with DeadlineExceeded (a
        ShardUnavailable) rather than wait for an owner past ``seconds`` from now, whatever
        their retries had left; nested blocks keep the earlier deadline. Local reads do not
        wait on anything. A web request's way of saying how long it may take::

            with client.deadline(0.2):
                client.put(sessions, sid, data)
        """
        if (type(seconds) not in (int, float) or not math.isfinite(seconds)
                or seconds <= 0):
            raise TransactionError(f"a deadline must be a positive number of seconds, not "
                                   f"{seconds!r}", hint="pass e.g. 0.2")
        at = time.monotonic() + seconds
        before = self.owners.set_deadline(None)
        self.owners.set_deadline(at if before is None else min(before, at))
        try:
            yield
        finally:
            self.owners.set_deadline(before)

    # -- writes ------------------------------------------------------------------------------

    def _send_parts(self, parts: dict[int, list[list[Any]]], version: int
                    ) -> dict[int, PartOutcome]:
        """Each shard's ops (routed by the map of ``version``) as one write, all shards at
        once; each shard's outcome. Ops a shard refused because a re-shard moved their slots
        are sent where they live now (``calls.RoutedParts``)."""
        check_fork()
        counters = self._counts.mine()
        routed = calls.RoutedParts(self.tables, parts, version)
        while True:
            now = routed.requests()
            counters["batches_sent"] += len(now)
            counters["ops_sent"] += sum(len(p) for p in now.values())
            replies = self.owners.requests(
                {s: WRITE.request_for(ops) for s, ops in now.items()}, write=True,
                map_version=routed.version)
            if not routed.take(replies):
                break
        outcomes = routed.outcomes()
        counters["batches_failed"] += sum(o[0] is not None for o in outcomes.values())
        return outcomes

    def _write_one(self, ct: ClientTable, key: Any, code: int, arg: Any) -> Any:
        check_fork()
        version = self.routes.version  # before routing: a request never claims a newer map
        shard, ops = calls.one_op(ct, key, code, arg)
        counters = self._counts.mine()
        while True:
            counters["batches_sent"] += 1
            counters["ops_sent"] += 1
            r = self.owners.request(shard, WRITE.code, ops, write=True, map_version=version)
            if not follow_moved(self.routes, r, version):
                break
            version = self.routes.version  # the slot moved: a new request where it lives now
            shard = self.tables.shard_of_op(ops[0])
        if isinstance(r, Error):
            counters["batches_failed"] += 1
        return calls.op_result(r)

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None) -> None:
        """One acked write: returns once the owner committed it. On a table with ttl the row
        expires ``ttl`` seconds from now (None: the table's default)."""
        ct = self.tables[table]
        self._write_one(ct, key, OP_PUT, ct.encode(value, ttl))

    def persist(self, table: TableRef, key: Any) -> bool:
        """Make the row never expire; whether it had an expiry to remove."""
        ct = self.tables[table]
        ct.check_expiring("persist")
        return bool(self._write_one(ct, key, OP_PERSIST, None))

    def delete(self, table: TableRef, key: Any) -> bool:
        return bool(self._write_one(self.tables[table], key, OP_DELETE, None))

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        """Atomically add ``delta`` on the owner; the new value."""
        return int(self._write_one(self.tables[table], key, OP_INCR, incr_delta(delta)))

    def cas(self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
            expected_hash: bytes | None = None) -> bool:
        """Put ``value`` only if the row holds ``expected`` (None: absent); False otherwise."""
        b = self.batch()
        b.cas(table, key, value, expected, expected_hash=expected_hash)
        try:
            b.send()
        except ConflictError:
            return False
        return True

    def batch(self) -> Batch:
        """Collect writes; on exit each shard's part is sent as one message and applied
        atomically. A batch over several shards is atomic per shard, not across them."""
        return Batch(self.tables, self._send_parts)

    def writer(self, *, batch_size: int = 1000, window: int = 4) -> Writer:
        """Pipelined bulk writes: ops are buffered per shard, sent as batches of ``batch_size``,
        with up to ``window`` batches in flight per shard while the caller goes on. Batches of
        one shard are applied in the order sent, each atomically; ``flush()`` (or the end of a
        ``with`` block) waits for every ack. See ``lmshard.writer``."""
        check_fork()
        w = Writer(self, batch_size=batch_size, window=window)
        self._writers.add(w)
        return w

    # -- reads -------------------------------------------------------------------------------

    def get(self, table: TableRef, key: Any, default: Any = None) -> Any:
        check_fork()
        ct = self.tables[table]
        kb = ct.kenc(key)
        version = self.routes.version_bytes  # before routing: a newer map is never assumed
        hit = ct.local[ct.shard(key, kb)]
        # The hot path: one read txn on this process's open environment.
        data = SLOTS_CHANGED if hit is None else routed_get(
            hit[0], hit[1], kb, hit[2], version, hit[3])
        if data is SLOTS_CHANGED:
            data = self._row(ct, key, kb)
        if ct.expiring:
            return ct.value(data, default)
        return default if data is None else ct.loads(data)

    def _row(self, ct: ClientTable, key: Any, kb: bytes) -> bytes | None:
        """A row's stored bytes: from the shard's files, opened here now if they can be (after
        the copy has this client's last write, on a replica host), or over the wire; routed
        again when the shard read says a re-shard moved on."""
        routes = self.routes
        while True:
            generation, version = routes.generation, routes.version
            shard = ct.shard(key, kb)
            data = self._local.row(ct, shard, kb)
            if routes.generation != generation:
                continue  # the shard recorded a newer map, now adopted: route again
            if data is not NOT_HERE:
                return data  # type: ignore[no-any-return]
            try:
                return self._remote.one(shard, GET.request_for(ct.tid, kb),  # type: ignore[no-any-return]
                                        map_version=version)
            except SlotMoved as exc:
                if not follow_moved(routes, exc, version):
                    raise

    def _live(self, ct: ClientTable, key: Any) -> bytes | None:
        """The row's stored bytes, None when there is none (or it expired)."""
        check_fork()
        data = self._row(ct, key, ct.kenc(key))
        return live_row(data) if ct.expiring else data

    def get_hash(self, table: TableRef, key: Any) -> bytes | None:
        """The stored value's hash, for ``cas(..., expected_hash=)``."""
        ct = self.tables[table]
        data = self._live(ct, key)
        return None if data is None else value_hash(ct.payload(data))

    def ttl(self, table: TableRef, key: Any) -> float | None:
        """Seconds until the row expires; None when it never does, 0.0 when there is no row."""
        ct = self.tables[table]
        ct.check_expiring("ttl")
        return seconds_left(self._live(ct, key))

    def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        check_fork()
        keys = list(keys)
        return calls.read_planned(self.routes, lambda: calls.GetMany(  # type: ignore[no-any-return]
            self._local, self.tables[table], keys, default), self._remote.many)

    def exists(self, table: TableRef, key: Any) -> bool:
        marker = object()
        return self.get(table, key, marker) is not marker

    def _raw_range(self, shard: int, ct: ClientTable, lo: bytes | None, hi: bytes | None,
                   reverse: bool, version: int) -> Iterator[tuple[bytes, bytes]]:
        st = self._local.get(shard)
        if st is None:
            return self._remote.scan(shard, ct.tid, lo, hi, reverse, version)
        return calls.local_rows(self._local, shard, st, ct, lo, hi, reverse)

    def scan(self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None,
             reverse: bool = False, limit: int | None = None,
             where: Callable[[Any], bool] | None = None) -> Iterator[tuple[Any, Any]]:
        """Yield (key, value) in key order across every shard (merged); ``end`` exclusive."""
        check_fork()
        ct = self.tables[table]
        lo, hi = key_bounds(ct, prefix, start, end)
        yield from calls.routed_rows(
            self.routes, lambda version: [self._raw_range(s, ct, lo, hi, reverse, version)
                                          for s in ct.route.shards_for(prefix)],
            ct, reverse, where, limit)

    def count(self, table: TableRef, prefix: Any = None, start: Any = None,
              end: Any = None) -> int:
        check_fork()
        return int(calls.read_planned(self.routes, lambda: calls.Count(
            self._local, self.tables[table], prefix, start, end), self._remote.many))

    def lookup(self, table: TableRef, index: str, value: Any, prefix: bool = False
               ) -> list[tuple[Any, Any]]:
        """Rows by index value, from every shard the table lives on, in key order."""
        check_fork()
        if not prefix and value is not None:
            rows = unique_lookup(self._local, self.tables[table], index, value)
            if rows is not None:
                return rows  # type: ignore[no-any-return]
        return calls.read_planned(self.routes, lambda: calls.Lookup(  # type: ignore[no-any-return]
            self._local, self.tables[table], index, value, prefix), self._remote.many)

    # -- the service -------------------------------------------------------------------------

    def watch(self, table: TableRef | None = None, *, prefix: Any = None,
              since: str | None = None) -> ServiceWatch:
        """Follow the service's change feed: the changes of ``table`` (None: every table;
        ``prefix`` as in ``scan``) committed after the call (``since=None`` or "now"), from
        the oldest the logs keep ("start"), or after a ``Watch.cursor`` stored earlier. Order
        is per shard (commit order); see ``lmshard.watch``."""
        check_fork()
        tids, pb = watch_filter(self.tables, table, prefix)
        timeout = self.timeout_ms / 1000 * (self.retries + 1)
        return ServiceWatch(self.config, self.tables.each(), tids, pb, since, timeout)

    def ping(self, shard: int) -> dict[str, Any]:
        """The owner's health; raises ShardUnavailable when it does not answer."""
        check_fork()
        t = time.perf_counter()
        r: dict[str, Any] = self._remote.one(shard, PING.request_for())
        r["rtt_ms"] = (time.perf_counter() - t) * 1000
        return r

    def stats(self) -> dict[str, Any]:
        """Every shard's statistics (as its owner reports them) and this client's counters."""
        check_fork()
        replies = self.owners.requests({s: STATS.request_for() for s in range(self.shards)},
                                       write=False, silent_ok=True)  # a dead shard: one timeout
        return calls.stats_reply(replies, self.counters())

    def close(self) -> None:
        for w in list(self._writers):  # their sockets belong to the owner connections' context
            w.close()
        self._remote.close()
        for ct in self.tables.each():
            ct.forget_local()
        self._local.close()
        self.owners.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: Config | str | os.PathLike[str] | None = None, schema: Schema | None = None,
            **options: Any) -> Client:
    """Connect to a running service described by ``config`` (a Config, a path, or None for
    $LMSHARD_CONFIG / config/lmshard.toml). Options: timeout_ms, retries, local_reads,
    breaker_ms."""
    return Client(config, schema, **options)


if TYPE_CHECKING:

    def _offers_the_data_api(client: Client) -> DataAPI:
        return client  # mypy checks that Client implements lmshard.api.DataAPI
