"""The asyncio client: ``lmshard.aio.connect(config)`` returns an ``AsyncClient``.

It offers the sync ``Client``'s data API with ``await`` (``lmshard.api.AsyncDataAPI``) and shares
with it everything a call means: routing and encoding (``lmshard.client_tables``), the requests
and what their replies mean (``lmshard.calls``, ``lmshard.protocol``), typed errors
(``lmshard.errors``), the batch (``lmshard.batch``), the writer's streams (``lmshard.writer``) and
the change feed (``lmshard.watch``). Only the transport is its own (``lmshard.aio_owners``):
many requests in flight on one socket per shard, so the coroutines of a process that write at
the same time are committed together by the owners' group commit.

Reads of the shards mapped in this process are the sync client's plain LMDB reads (a point get
takes microseconds: no thread pool, no wire), awaitable for uniformity. Shards that cannot be
mapped here are read from their owners (the reader pool is the sync client's).

Share one client per process (``async with lmshard.aio.connect() as db`` at start-up, e.g. in a
web app's lifespan); it serves every coroutine of the loop it runs on. After ``fork()`` the child
opens its own sockets and maps on first use.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from lmshard import calls
from lmshard.aio_owners import AsyncOwnerConnections, readable
from lmshard.aio_writer import AsyncWriter
from lmshard.batch import Batch, PartOutcome
from lmshard.bound_tables import live_row
from lmshard.calls import RemoteParts
from lmshard.client_tables import ClientTable, ClientTables
from lmshard.config import Config
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
    SCAN,
    SCAN_PAGE,
    STATS,
    WRITE,
    incr_delta,
    next_page,
)
from lmshard.reads import NOT_HERE, REPLICA_POLL_S
from lmshard.schema import Schema
from lmshard.slot_routes import follow_moved
from lmshard.txn import TableRef, key_bounds, seconds_left, value_hash
from lmshard.watch import SILENCE, Change, ServiceWatch, watch_filter

if TYPE_CHECKING:
    from lmshard.api import AsyncDataAPI

SCAN_YIELD_EVERY = 256
"""A scan lets other coroutines run after this many rows."""

class AsyncClient(calls.ClientCore[AsyncOwnerConnections]):
    """A connection to a running lmshard service for coroutines; share one per process."""

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
        super().__init__(AsyncOwnerConnections, config, schema, timeout_ms=timeout_ms,
                         retries=retries, local_reads=local_reads, breaker_ms=breaker_ms)
        self._writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()

    # -- writes ------------------------------------------------------------------------------

    async def _write_one(self, ct: ClientTable, key: Any, code: int, arg: Any) -> Any:
        check_fork()
        version = self.routes.version  # before routing: a request never claims a newer map
        shard, ops = calls.one_op(ct, key, code, arg)
        counters = self._counts.mine()
        while True:
            counters["batches_sent"] += 1
            counters["ops_sent"] += 1
            r = await self.owners.request(shard, WRITE.code, ops, write=True,
                                          map_version=version)
            if not follow_moved(self.routes, r, version):
                break
            version = self.routes.version  # the slot moved: a new request where it lives now
            shard = self.tables.shard_of_op(ops[0])
        if isinstance(r, Error):
            counters["batches_failed"] += 1
        return calls.op_result(r)

    async def _send_parts(self, parts: dict[int, list[list[Any]]], version: int
                          ) -> dict[int, PartOutcome]:
        """As ``Client._send_parts``."""
        check_fork()
        counters = self._counts.mine()
        routed = calls.RoutedParts(self.tables, parts, version)
        while True:
            now = routed.requests()
            counters["batches_sent"] += len(now)
            counters["ops_sent"] += sum(len(p) for p in now.values())
            replies = await self.owners.requests(
                {s: WRITE.request_for(ops) for s, ops in now.items()}, write=True,
                map_version=routed.version)
            if not routed.take(replies):
                break
        outcomes = routed.outcomes()
        counters["batches_failed"] += sum(o[0] is not None for o in outcomes.values())
        return outcomes

    async def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None
                  ) -> None:
        """One acked write: returns once the owner committed it. On a table with ttl the row
        expires ``ttl`` seconds from now (None: the table's default)."""
        ct = self.tables[table]
        await self._write_one(ct, key, OP_PUT, ct.encode(value, ttl))

    async def persist(self, table: TableRef, key: Any) -> bool:
        """Make the row never expire; whether it had an expiry to remove."""
        ct = self.tables[table]
        ct.check_expiring("persist")
        return bool(await self._write_one(ct, key, OP_PERSIST, None))

    async def delete(self, table: TableRef, key: Any) -> bool:
        return bool(await self._write_one(self.tables[table], key, OP_DELETE, None))

    async def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        """Atomically add ``delta`` on the owner; the new value."""
        return int(await self._write_one(self.tables[table], key, OP_INCR, incr_delta(delta)))

    async def cas(self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
                  expected_hash: bytes | None = None) -> bool:
        """Put ``value`` only if the row holds ``expected`` (None: absent); False otherwise."""
        b = self.batch()
        b.cas(table, key, value, expected, expected_hash=expected_hash)
        try:
            await b.commit()
        except ConflictError:
            return False
        return True

    def batch(self) -> AsyncBatch:
        """Collect writes (``async with client.batch() as b: b.put(...)``); at the end of the
        block each shard's part is sent as one message and applied atomically."""
        return AsyncBatch(self.tables, self._send_parts)

    def writer(self, *, batch_size: int = 1000, window: int = 4) -> AsyncWriter:
        """Pipelined bulk writes (``async with client.writer() as w: await w.put(...)``), as
        ``Client.writer``; ``put`` waits when the window of batches in flight is full."""
        w = AsyncWriter(self, batch_size=batch_size, window=window)
        self._writers.add(w)
        return w

    # -- reads -------------------------------------------------------------------------------

    async def get(self, table: TableRef, key: Any, default: Any = None) -> Any:
        check_fork()
        ct = self.tables[table]
        kb = ct.kenc(key)
        version = self.routes.version_bytes  # before routing: a newer map is never assumed
        hit = ct.local[ct.shard(key, kb)]
        # A read of this process's map: no await, no thread.
        data = SLOTS_CHANGED if hit is None else routed_get(
            hit[0], hit[1], kb, hit[2], version, hit[3])
        if data is SLOTS_CHANGED:
            data = await self._row(ct, key, kb)
        if ct.expiring:
            return ct.value(data, default)
        return default if data is None else ct.loads(data)

    async def _live(self, ct: ClientTable, key: Any) -> bytes | None:
        """The row's stored bytes, None when there is none (or it expired)."""
        check_fork()
        data = await self._row(ct, key, ct.kenc(key))
        return live_row(data) if ct.expiring else data  # type: ignore[no-any-return]

    async def _row(self, ct: ClientTable, key: Any, kb: bytes) -> Any:
        """A row's stored bytes (None: none), as ``Client._row``: routed again when the shard
        read says a re-shard moved on."""
        routes = self.routes
        while True:
            generation, version = routes.generation, routes.version
            shard = ct.shard(key, kb)
            if self._local.unseen[shard] is not None:
                await self._caught_up(shard)
            data = self._local.row(ct, shard, kb)
            if routes.generation != generation:
                continue  # the shard recorded a newer map, now adopted: route again
            if data is not NOT_HERE:
                return data
            try:
                return await self._remote_one(shard, GET.request_for(ct.tid, kb), version)
            except SlotMoved as exc:
                if not follow_moved(routes, exc, version):
                    raise

    async def _caught_up(self, shard: int) -> None:
        """On a replica host: wait, without blocking the loop, until this host's copy of
        ``shard`` has this client's last write to it; ReplicaBehind after
        ``client.replica_wait`` (``lmshard.reads``)."""
        local = self._local
        st = local.get(shard)
        if st is None:
            return
        until = time.monotonic() + self.config.replica_wait
        while (have := local.look(shard, st)) is not None:
            if time.monotonic() >= until:
                raise local.behind(shard, st, have)
            await asyncio.sleep(REPLICA_POLL_S)

    async def _all_caught_up(self) -> None:
        """``_caught_up`` for every shard with a write this host's copy may not have yet."""
        if any(self._local.unseen):
            for shard, ack in enumerate(self._local.unseen):
                if ack is not None:
                    await self._caught_up(shard)

    async def get_hash(self, table: TableRef, key: Any) -> bytes | None:
        """The stored value's hash, for ``cas(..., expected_hash=)``."""
        ct = self.tables[table]
        data = await self._live(ct, key)
        return None if data is None else value_hash(ct.payload(data))

    async def ttl(self, table: TableRef, key: Any) -> float | None:
        """Seconds until the row expires; None when it never does, 0.0 when there is no row."""
        ct = self.tables[table]
        ct.check_expiring("ttl")
        return seconds_left(await self._live(ct, key))

    async def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        check_fork()
        await self._all_caught_up()
        keys = list(keys)
        return await self._read_planned(  # type: ignore[no-any-return]
            lambda: calls.GetMany(self._local, self.tables[table], keys, default))

    async def exists(self, table: TableRef, key: Any) -> bool:
        marker = object()
        return await self.get(table, key, marker) is not marker

    async def count(self, table: TableRef, prefix: Any = None, start: Any = None,
                    end: Any = None) -> int:
        check_fork()
        await self._all_caught_up()
        return int(await self._read_planned(
            lambda: calls.Count(self._local, self.tables[table], prefix, start, end)))

    async def lookup(self, table: TableRef, index: str, value: Any, prefix: bool = False
                     ) -> list[tuple[Any, Any]]:
        """Rows by index value, from every shard the table lives on, in key order."""
        check_fork()
        if not prefix and value is not None:
            rows = unique_lookup(self._local, self.tables[table], index, value)
            if rows is not None:
                return rows  # type: ignore[no-any-return]
        await self._all_caught_up()
        return await self._read_planned(  # type: ignore[no-any-return]
            lambda: calls.Lookup(self._local, self.tables[table], index, value, prefix))

    async def _read_planned(self, make: Callable[[], calls.ReadPlan]) -> Any:
        """As ``calls.read_planned``: the plan's answer, made again under the newer map an
        owner answered SlotMoved with."""
        while True:
            plan, version = calls.routed(self.routes, make)
            try:
                replies = await self._remote_many(plan.remote, version)
            except SlotMoved as exc:
                if not follow_moved(self.routes, exc, version):
                    raise
                continue
            return plan.fill(replies)

    def scan(self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None,
             reverse: bool = False, limit: int | None = None,
             where: Callable[[Any], bool] | None = None) -> AsyncIterator[tuple[Any, Any]]:
        """``async for key, value in client.scan(...)``: (key, value) in key order across every
        shard (merged); ``end`` exclusive. Bad arguments raise here, at the call."""
        check_fork()
        ct = self.tables[table]
        lo, hi = key_bounds(ct, prefix, start, end)
        return self._scan(ct, prefix, lo, hi, reverse, limit, where)

    def _local_streams(self, ct: ClientTable, prefix: Any, lo: bytes | None, hi: bytes | None,
                       reverse: bool) -> list[Iterator[tuple[bytes, bytes]]]:
        """The scan's rows of each shard it reads under the current map, all mapped here."""
        local = self._local
        return [calls.local_rows(local, s, st, ct, lo, hi, reverse)
                for s in ct.route.shards_for(prefix) if (st := local.get(s)) is not None]

    async def _scan(self, ct: ClientTable, prefix: Any, lo: bytes | None,
                    hi: bytes | None, reverse: bool, limit: int | None,
                    where: Callable[[Any], bool] | None) -> AsyncIterator[tuple[Any, Any]]:
        await self._all_caught_up()
        shards = ct.route.shards_for(prefix)
        stores = [self._local.get(s) for s in shards]
        if all(st is not None for st in stores):  # the sync client's scan, as it is
            rows = calls.routed_rows(
                self.routes, lambda version: self._local_streams(ct, prefix, lo, hi, reverse),
                ct, reverse, where, limit)
            try:
                for n, row in enumerate(rows, 1):
                    yield row
                    if n % SCAN_YIELD_EVERY == 0:
                        await asyncio.sleep(0)
            finally:
                _close(rows)  # ends the read transactions
            return
        merged = _merge([
            _local_async(calls.local_rows(self._local, s, st, ct, lo, hi, reverse))
            if st is not None
            else self._remote_rows(s, ct.tid, lo, hi, reverse, self.routes.version)
            for s, st in zip(shards, stores, strict=True)], reverse)
        if limit is not None and limit <= 0:
            return
        n = 0
        async for kb, vb in merged:  # filtered as calls.scan_rows does
            value = ct.loads(vb)
            if where is not None and not where(value):
                continue
            yield ct.kdec(kb), value
            n += 1
            if limit is not None and n >= limit:
                return

    async def _remote_rows(self, shard: int, tid: bytes, lo: bytes | None, hi: bytes | None,
                           reverse: bool, version: int) -> AsyncIterator[tuple[bytes, bytes]]:
        """One shard's encoded rows over the wire, a ``scan`` page at a time (the pages of
        ``protocol.paged_scan``), routed by the slot map of ``version``."""
        while True:
            items, more = await self._remote_one(
                shard, SCAN.request_for(tid, lo, hi, reverse, SCAN_PAGE), version)
            for k, v in items:
                yield k, v
            bounds = next_page(items[-1][0], lo, hi, reverse) if more and items else None
            if bounds is None:
                return
            lo, hi = bounds

    async def _remote_one(self, shard: int, request: tuple[int, Any], map_version: int = 0
                          ) -> Any:
        check_fork()
        self._counts.mine()["remote_reads"] += 1
        r = await self.owners.request(shard, request[0], request[1], write=False,
                                      map_version=map_version)
        if isinstance(r, Error):
            raise r
        return r

    async def _remote_many(self, parts: RemoteParts, version: int = 0) -> list[Any]:
        if not parts:
            return []
        if len(parts) == 1:
            return [await self._remote_one(*parts[0], version)]
        return list(await asyncio.gather(*(self._remote_one(s, r, version) for s, r in parts)))

    # -- the service -------------------------------------------------------------------------

    async def watch(self, table: TableRef | None = None, *, prefix: Any = None,
                    since: str | None = None) -> AsyncWatch:
        """Follow the change feed (as ``Client.watch``): ``async for change in await
        client.watch("users")``; the watch has started (``cursor`` is known) when this
        returns."""
        check_fork()
        tids, pb = watch_filter(self.tables, table, prefix)
        timeout = self.timeout_ms / 1000 * (self.retries + 1)
        w = ServiceWatch(self.config, self.tables.each(), tids, pb, since, timeout, wait=False)
        deadline = time.monotonic() + timeout
        try:
            while not w.started:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise w.not_started(timeout)
                await readable(w.sockets(), left)
                w.receive()
                w.get(timeout=0)  # raises what receive() met
        except BaseException:
            w.close()
            raise
        return AsyncWatch(w)

    async def ping(self, shard: int) -> dict[str, Any]:
        """The owner's health; raises ShardUnavailable when it does not answer."""
        t = time.perf_counter()
        r: dict[str, Any] = await self._remote_one(shard, PING.request_for())
        r["rtt_ms"] = (time.perf_counter() - t) * 1000
        return r

    async def stats(self) -> dict[str, Any]:
        """Every shard's statistics (as its owner reports them) and this client's counters."""
        check_fork()
        replies = await self.owners.requests(
            {s: STATS.request_for() for s in range(self.shards)}, write=False, silent_ok=True)
        return calls.stats_reply(replies, self.counters())

    async def close(self) -> None:
        for w in list(self._writers):
            w.close()
        for ct in self.tables.each():
            ct.forget_local()
        self._local.close()
        self.owners.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect(config: Config | str | os.PathLike[str] | None = None, schema: Schema | None = None,
            **options: Any) -> AsyncClient:
    """An async client of the running service described by ``config`` (as ``lmshard.connect``;
    options: timeout_ms, retries, local_reads, breaker_ms). Use ``async with`` or
    ``await client.close()``."""
    return AsyncClient(config, schema, **options)


class AsyncBatch(Batch):
    """Writes collected by ``AsyncClient.batch()``: the sync client's ``Batch`` (the same ops,
    the same per-shard outcome), sent by ``async with`` or ``await batch.commit()``."""

    def __init__(self, tables: ClientTables,
                 send_parts: Callable[[dict[int, list[list[Any]]], int], Any]) -> None:
        super().__init__(tables, _sent_by_commit)
        self._asend_parts = send_parts

    async def commit(self) -> None:
        """Send every shard's part and wait for the outcomes (what the end of the ``async
        with`` block does); the first error when no part committed, BatchPartiallyApplied
        when some did."""
        self.settle(await self._asend_parts(self._parts, self.map_version))

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and len(self):
            await self.commit()


def _sent_by_commit(parts: dict[int, list[list[Any]]], version: int
                    ) -> dict[int, PartOutcome]:
    raise TransactionError("an async batch is sent by `async with` or `await batch.commit()`")


class AsyncWatch:
    """``AsyncClient.watch()``: the sync client's ``ServiceWatch`` (the same positions,
    cursors, restarts and errors), waited on by the event loop. ``async for change in w``;
    ``await w.get(timeout)``; ``w.cursor``; ``async with`` closes it."""

    def __init__(self, watch: ServiceWatch) -> None:
        self._watch = watch

    @property
    def cursor(self) -> str:
        """The position after the last change returned (pass it as ``since``)."""
        return self._watch.cursor

    async def get(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` seconds (None: as long as it takes);
        None when none came in time."""
        w = self._watch
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            w.receive()
            change = w.get(timeout=0)
            if change is not None:
                return change
            wait = SILENCE / 3
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            await readable(w.sockets(), wait)

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Change:
        change = await self.get()
        assert change is not None
        return change

    def close(self) -> None:
        """Stop watching; ``cursor`` stays readable."""
        self._watch.close()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# -- scans that read some shards over the wire ------------------------------------------------


async def _local_async(rows: Iterator[tuple[bytes, bytes]]) -> AsyncIterator[tuple[bytes, bytes]]:
    try:
        for row in rows:
            yield row
    finally:
        _close(rows)


def _close(rows: Iterator[Any]) -> None:
    """End a generator of rows now (and its read transaction), not when it is collected."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


async def _merge(streams: list[AsyncIterator[tuple[bytes, bytes]]], reverse: bool
                 ) -> AsyncIterator[tuple[bytes, bytes]]:
    """The shards' rows (each stream in key order) in one key order."""
    heads: dict[int, tuple[bytes, bytes]] = {}
    for i, stream in enumerate(streams):
        row = await anext(stream, None)
        if row is not None:
            heads[i] = row
    pick = max if reverse else min
    while heads:
        i = pick(heads, key=lambda j: heads[j][0])
        yield heads[i]
        row = await anext(streams[i], None)
        if row is None:
            del heads[i]
        else:
            heads[i] = row


if TYPE_CHECKING:

    def _offers_the_async_data_api(client: AsyncClient) -> AsyncDataAPI:
        return client  # mypy checks that AsyncClient implements lmshard.api.AsyncDataAPI
