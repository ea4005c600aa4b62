"""What the client's data-API calls mean, written once for both transports.

``lmshard.Client`` (blocking sockets) and ``lmshard.aio.AsyncClient`` (asyncio) differ only in
how a request reaches an owner and how they wait for the reply. Everything else lives here:
which shard a key goes to and the op that writes it, what a reply means, and for the reads that
span shards, the plan: what this process reads from its own maps at once, which requests go
over the wire, and how their replies are merged into the answer. (The way httpx's ``Client`` and
``AsyncClient`` share their models, and redis-py's sync and asyncio clients share command
mixins.)
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any, Generic, Protocol, TypeVar

from lmshard.batch import PartOutcome
from lmshard.client_counters import ClientCounters
from lmshard.client_tables import ClientTable, ClientTables
from lmshard.config import Config, load_config
from lmshard.errors import Error, SlotMoved, UnknownIndex
from lmshard.forksafe import on_fork_in_child
from lmshard.keys import encode_index_value
from lmshard.protocol import COUNT, GET_MANY, LOOKUP, op
from lmshard.reads import LocalShards, Request
from lmshard.routing import SlotMap
from lmshard.schema import Schema
from lmshard.slot_routes import SlotRoutes, follow_moved, grown_config
from lmshard.store import Store
from lmshard.txn import TableRef, filtered_rows, index_prefix, key_bounds

GET_MANY_CHUNK = 10_000
"""Keys per remote get_many request; the chunks of one call are sent at once."""

RemoteParts = list[tuple[int, Request]]
"""Read requests for the wire: (shard, (command code, body)), answered in this order."""

class OwnerLinks(Protocol):
    """What ``ClientCore`` needs of a client's connections to the owners (the sync
    ``OwnerConnections``, the async ``AsyncOwnerConnections``)."""

    timeout_ms: int
    retries: int
    on_ack: Callable[[int, str, int, int], None] | None

    def reset_after_fork(self) -> None: ...

    def grow(self, config: Config) -> None: ...


Owners = TypeVar("Owners", bound=OwnerLinks)


class ClientCore(Generic[Owners]):
    """What both clients hold and do alike: the config and schema, the tables, the counters,
    the connections to the owners (of the class each client passes), the shards mapped in this
    process, and dropping what must not cross fork() (``lmshard.forksafe`` runs
    ``reset_after_fork`` in a child, whatever forked it)."""

    def __init__(
        self,
        owners_class: Callable[..., Owners],
        config: Config | str | os.PathLike[str] | None,
        schema: Schema | None,
        *,
        timeout_ms: int | None,
        retries: int | None,
        local_reads: bool | None,
        breaker_ms: int | None,
    ) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.schema = schema if schema is not None else self.config.load_schema()
        self.schema.check_sharded(self.config.shards)
        self.routes = SlotRoutes.of_config(self.config)
        """The slot map this client routes by (the config's until a re-shard moves on)."""
        self.routes.listen(self._grow)  # first: the shards exist before anything routes there
        self.tables = ClientTables(self.schema, self.routes)
        """The schema's tables by ``Table``, name or UUID: encoders, decoders and route."""
        self._counts = ClientCounters()
        self.owners: Owners = owners_class(
            self.config, self._counts,
            timeout_ms=self.config.timeout_ms if timeout_ms is None else timeout_ms,
            retries=self.config.retries if retries is None else retries,
            breaker_ms=self.config.breaker_ms if breaker_ms is None else breaker_ms)
        """The connections to the shard owners and the requests over them."""
        self._local = LocalShards(
            self.config, self.schema,
            enabled=self.config.local_reads if local_reads is None else local_reads,
            tables=self.tables, routes=self.routes)
        self.owners.on_ack = self._local.note_ack  # read-your-writes on a replica host
        on_fork_in_child(self.reset_after_fork)

    @property
    def slot_map(self) -> SlotMap:
        """The slot map this client routes by."""
        return self.routes.map

    @property
    def shards(self) -> int:
        """How many shards the slot map names."""
        return self.routes.shards

    def _grow(self, slot_map: SlotMap) -> None:
        """A newer slot map names more shards than the config: connect to them too."""
        if slot_map.shards <= self.config.shards:
            return
        config = grown_config(self.config, slot_map.shards)
        self.owners.grow(config)
        self._local.grow(config)
        self.config = config

    @property
    def timeout_ms(self) -> int:
        """How long a request waits for its reply before it is resent."""
        return self.owners.timeout_ms

    @property
    def retries(self) -> int:
        """How often an unanswered request is resent before ShardUnavailable."""
        return self.owners.retries

    @property
    def local_reads(self) -> bool:
        """Whether reads map the shards' files in this process when they can be opened."""
        return self._local.enabled

    def counters(self) -> dict[str, int]:
        """What this client did in this process: batches_sent, ops_sent, retries, timeouts,
        remote_reads, batches_failed, unavailable, deadlines (summed over its threads)."""
        return self._counts.total()

    def table(self, table: TableRef) -> ClientTable:
        """The table as this client encodes and routes it; UnknownTable if not in the schema."""
        return self.tables[table]

    def local_store(self, shard: int) -> Store | None:
        """The shard's store opened read-only in this process, or None (read over the wire)."""
        return self._local.get(shard)

    def reset_after_fork(self) -> None:
        """In a forked child: drop what must not cross fork(); everything reopens on use."""
        for ct in self.tables.each():
            ct.forget_local()  # the child's stores reopen their environments
        self._counts.reset()  # the child counts its own work, with a lock of its own
        self.owners.reset_after_fork()
        self._local.reset_after_fork()


# -- writes ------------------------------------------------------------------------------------


def one_op(ct: ClientTable, key: Any, code: int, arg: Any) -> tuple[int, list[list[Any]]]:
    """The shard of ``key`` and the ``write`` body of one op on it (a single put, delete, incr);
    bad keys raise here, before anything is sent."""
    kb = ct.kenc(key)
    return ct.shard(key, kb), [op(code, ct.tid, kb, arg)]


def op_result(reply: Any) -> Any:
    """The result of a one-op write from the owner's reply; the Error it answered raises."""
    if isinstance(reply, Error):
        raise reply
    return reply[1][0]


def part_outcomes(replies: dict[int, Any]) -> dict[int, PartOutcome]:
    """Each shard's write reply (a body or an Error) as the batch's part outcome."""
    return {s: (r, None) if isinstance(r, Error) else (None, r) for s, r in replies.items()}


class RoutedParts:
    """A write's per-shard parts (``Batch``) followed through re-shards, for both clients:
    parts refused with SlotMoved are routed again under the adopted map and sent as new
    requests (``take`` says when), and ``outcomes`` puts each part's results back in the
    order of its ops, under the shard it was first sent to."""

    def __init__(self, tables: ClientTables, parts: dict[int, list[list[Any]]],
                 version: int) -> None:
        self.tables = tables
        self.parts = parts
        self.version = version
        """The version of the map the requests of this round were routed by."""
        self._pieces: dict[int, list[tuple[int, list[int]]]] = {
            s: [(s, list(range(len(ops))))] for s, ops in parts.items()}
        self._results: dict[int, list[Any]] = {s: [None] * len(ops) for s, ops in parts.items()}
        self._txn: dict[int, int] = {}
        self._errors: dict[int, Error] = {}

    def requests(self) -> dict[int, list[list[Any]]]:
        """The ops to send now, per shard."""
        return {t: [self.parts[s][i] for s, idx in pieces for i in idx]
                for t, pieces in self._pieces.items()}

    def take(self, replies: dict[int, Any]) -> bool:
        """Take the replies to ``requests()``; whether some ops were routed again (send
        ``requests()`` once more)."""
        moved: list[tuple[int, list[int]]] = []
        for t, r in replies.items():
            if follow_moved(self.tables.routes, r, self.version):
                moved.extend(self._pieces[t])
            else:
                self._settle(self._pieces[t], r)
        self._pieces = {}
        if not moved:
            return False
        self.version = self.tables.routes.version
        shard_of = self.tables.shard_of_op
        for s, idx in moved:
            by_shard: dict[int, list[int]] = {}
            for i in idx:
                by_shard.setdefault(shard_of(self.parts[s][i]), []).append(i)
            for t, ii in by_shard.items():
                self._pieces.setdefault(t, []).append((s, ii))
        return True

    def _settle(self, pieces: list[tuple[int, list[int]]], reply: Any) -> None:
        """Take one request's reply (a body or an Error) for the pieces of parts it held."""
        if isinstance(reply, Error):
            for s, _ in pieces:
                self._errors.setdefault(s, reply)
            return
        results = iter(reply[1])
        for s, idx in pieces:
            self._txn.setdefault(s, reply[0])
            for i in idx:
                self._results[s][i] = next(results)

    def outcomes(self) -> dict[int, PartOutcome]:
        """Each part's outcome, as ``Batch.settle`` takes it."""
        return {s: (self._errors[s], None) if s in self._errors
                else (None, [self._txn[s], self._results[s]]) for s in self.parts}


# -- reads over several shards -----------------------------------------------------------------

class ReadPlan(Protocol):
    """A read over several shards (``GetMany``, ``Count``, ``Lookup``): its local reads done,
    its remote requests listed; ``fill`` makes the answer of their replies."""

    remote: RemoteParts

    def fill(self, replies: list[Any]) -> Any: ...


Plan = TypeVar("Plan", bound=ReadPlan)

_END: Any = object()


def routed(routes: SlotRoutes, make: Callable[[], Plan]) -> tuple[Plan, int]:
    """``make()`` and the version of the slot map it was routed by, made again while a shard
    it read recorded a newer map (adopted by the read: routes moved on)."""
    while True:
        generation, version = routes.generation, routes.version
        plan = make()
        if routes.generation == generation:
            return plan, version


def read_planned(routes: SlotRoutes, make: Callable[[], Plan],
                 many: Callable[[RemoteParts, int], list[Any]]) -> Any:
    """The answer of the read plan ``make()`` (``routed``), its remote requests sent by
    ``many(parts, map version)``; made again under the newer map an owner answered SlotMoved
    with."""
    while True:
        plan, version = routed(routes, make)
        try:
            replies = many(plan.remote, version) if plan.remote else []
        except SlotMoved as exc:
            if not follow_moved(routes, exc, version):
                raise
            continue
        return plan.fill(replies)


def close_rows(rows: Iterator[Any]) -> None:
    """End a generator of rows now (and its read transaction), not when it is collected."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


def routed_rows(routes: SlotRoutes,
                streams_of: Callable[[int], list[Iterator[tuple[bytes, bytes]]]],
                ct: ClientTable, reverse: bool, where: Callable[[Any], bool] | None,
                limit: int | None) -> Iterator[tuple[Any, Any]]:
    """``scan_rows`` of the shards' streams (``streams_of(map version)``), read under one slot
    map: when a shard read recorded a newer one (adopted: routes moved on), or an owner
    answered SlotMoved, before the first row, the scan starts again under the newer map. (The
    merge reads every stream's first row for its first.)"""
    while True:
        generation, version = routes.generation, routes.version
        streams = streams_of(version)
        rows = scan_rows(ct, streams, reverse, where, limit)
        try:
            first = next(rows, _END)
        except SlotMoved as exc:
            if not follow_moved(routes, exc, version):
                raise
            first = _END
        if routes.generation == generation:
            break
        for stream in streams:
            close_rows(stream)
    if first is not _END:
        yield first
        yield from rows


class GetMany:
    """``get_many``: the keys of the shards mapped here read at once; the others as requests
    (``remote``) whose replies ``fill`` puts in place. ``out`` is the answer."""

    def __init__(self, local: LocalShards, ct: ClientTable, keys: Any, default: Any) -> None:
        self.ct = ct
        keys = list(keys)
        self.out: list[Any] = [default] * len(keys)
        by_shard: dict[int, list[tuple[int, bytes]]] = {}
        for i, key in enumerate(keys):
            kb = ct.kenc(key)
            by_shard.setdefault(ct.shard(key, kb), []).append((i, kb))
        self._wanted: list[list[tuple[int, bytes]]] = []
        self.remote: RemoteParts = []
        for shard, items in by_shard.items():
            st = local.get(shard)
            if st is None:
                for c in range(0, len(items), GET_MANY_CHUNK):
                    chunk = items[c:c + GET_MANY_CHUNK]
                    self._wanted.append(chunk)
                    self.remote.append(
                        (shard, GET_MANY.request_for(ct.tid, [kb for _, kb in chunk])))
                continue
            self._read(local, shard, st, items)

    def _read(self, local: LocalShards, shard: int, st: Store,
              items: list[tuple[int, bytes]]) -> None:
        """Read ``items`` (position, encoded key) of ``shard`` from this process's map of it."""
        ct, out, loads = self.ct, self.out, self.ct.loads
        with local.read(shard, st) as r:
            foreign = local.foreign(shard, st, r.txn)
            b = st.tables[ct.table]
            if foreign is None and not b.expiring:
                get, db = r.txn.get, b.db  # the common case, inlined
                for i, kb in items:
                    data = get(kb, None, db)
                    if data is not None:
                        out[i] = loads(data)
                return
            for i, kb in items:
                if foreign is not None and not foreign.keep(ct, kb):
                    continue
                data = r.get_raw(ct.table, kb)
                if data is not None:
                    out[i] = loads(data)

    def fill(self, replies: list[Any]) -> list[Any]:
        """Put the replies to ``remote`` in place; the answer."""
        for items, datas in zip(self._wanted, replies, strict=True):
            for (i, _), data in zip(items, datas, strict=True):
                if data is not None:
                    self.out[i] = self.ct.loads(data)
        return self.out


class Count:
    """``count``: the shards mapped here counted at once, the others as requests."""

    def __init__(self, local: LocalShards, ct: ClientTable, prefix: Any, start: Any,
                 end: Any) -> None:
        lo, hi = key_bounds(ct, prefix, start, end)
        self.total = 0
        self.remote: RemoteParts = []
        for shard in ct.route.shards_for(prefix):
            st = local.get(shard)
            if st is None:
                self.remote.append((shard, COUNT.request_for(ct.tid, lo, hi)))
                continue
            with local.read(shard, st) as r:
                foreign = local.foreign(shard, st, r.txn)
                if foreign is None:
                    self.total += r.count_raw(ct.table, lo, hi)
                else:  # a re-shard moves slots: count the rows of this shard's own
                    self.total += sum(1 for _ in foreign.rows(ct, r.scan_raw(ct.table, lo, hi)))

    def fill(self, replies: list[Any]) -> int:
        return self.total + sum(int(n) for n in replies)


class Lookup:
    """``lookup``: rows by index value from every shard the table lives on, in key order."""

    def __init__(self, local: LocalShards, ct: ClientTable, index: str, value: Any,
                 prefix: bool) -> None:
        if index not in ct.table.indexes:
            raise UnknownIndex(f"table {ct.name!r} has no index {index!r}",
                               hint=f"its indexes: {', '.join(ct.table.indexes) or '(none)'}")
        self.ct = ct
        self.rows: list[tuple[bytes, bytes]] = []
        self.remote: RemoteParts = []
        if value is None:
            return
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        for shard in ct.route.shards_for():
            st = local.get(shard)
            if st is None:
                self.remote.append((shard, LOOKUP.request_for(ct.tid, index, ivb, prefix)))
                continue
            with local.read(shard, st) as r:
                foreign = local.foreign(shard, st, r.txn)
                rows = r.lookup_rows_raw(ct.table, index, ivb, prefix)
                self.rows.extend(rows if foreign is None else foreign.rows(ct, rows))

    def fill(self, replies: list[Any]) -> list[tuple[Any, Any]]:
        ct = self.ct
        for found in replies:
            self.rows.extend((k, v) for k, v in found)
        self.rows.sort(key=itemgetter(0))
        return [(ct.kdec(k), ct.loads(v)) for k, v in self.rows]


def local_rows(local: LocalShards, shard: int, st: Store, ct: ClientTable, lo: bytes | None,
               hi: bytes | None, reverse: bool) -> Iterator[tuple[bytes, bytes]]:
    """One shard's encoded rows with ``lo <= key < hi``, from this process's map of it
    (``st``, as ``local.get`` returned it)."""
    with local.read(shard, st) as r:
        foreign = local.foreign(shard, st, r.txn)
        rows = r.scan_raw(ct.table, lo, hi, reverse)
        yield from rows if foreign is None else foreign.rows(ct, rows)


def scan_rows(ct: ClientTable, streams: list[Iterator[tuple[bytes, bytes]]], reverse: bool,
              where: Callable[[Any], bool] | None, limit: int | None
              ) -> Iterator[tuple[Any, Any]]:
    """``scan``: the shards' encoded rows (each stream in key order) merged, decoded, filtered."""
    merged = streams[0] if len(streams) == 1 else heapq.merge(
        *streams, key=itemgetter(0), reverse=reverse)
    return filtered_rows(merged, ct.kdec, ct.loads, where, limit)


def stats_reply(replies: dict[int, Any], client: dict[str, int]) -> dict[str, Any]:
    """``stats``: every shard's statistics as its owner reported them (an error for a shard
    that did not answer) and the client's counters."""
    shards = {s: {"error": str(r)} if isinstance(r, Error) else r
              for s, r in sorted(replies.items())}
    return {"shards": shards, "client": client}
