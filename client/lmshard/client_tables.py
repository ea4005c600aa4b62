"""The schema's tables as a client encodes and routes them.

A ``ClientTable`` is the schema's ``BoundTable`` (key and value encoders, decoders) without an
environment of its own (``db`` is None: a client reads many shards, each has its own handles,
kept in ``local``), plus the table's ``TableRoute`` and its 16-byte wire id. ``ClientTables``
finds one by ``Table``, name or UUID, and names the known tables when it does not; it follows
the client's slot map (``lmshard.slot_routes``): each newer map adopted rebuilds every table's
route, and a map with more shards grows ``local``.
"""

from __future__ import annotations

from typing import Any

from lmshard.errors import UnknownTable
from lmshard.routing import KeyRouter, SlotMap, TableRoute
from lmshard.schema import Schema, Table
from lmshard.slot_routes import SlotRoutes
from lmshard.txn import BoundTable

LocalHandles = tuple[Any, Any, Any, list[tuple[int, bytes]], dict[str, Any]]
"""A table's handles in one shard opened in this process (``LocalShards.handles``)."""


class ClientTable(BoundTable):
    """A table as the client routes it: encoders and decoders (``BoundTable``), route, wire id."""

    __slots__ = ("tid", "route", "shard", "local")

    def __init__(self, table: Table, slot_map: SlotMap) -> None:
        super().__init__(table, None, dict.fromkeys(table.indexes))
        self.tid = table.table_id.bytes
        """The table id as the wire carries it."""
        self.route = TableRoute(table, slot_map)
        self.shard: KeyRouter = self.route.shard
        """``route.shard``, one attribute away: the put and get paths call it for every key."""
        self.local: list[LocalHandles | None] = [None] * slot_map.shards
        """Per shard, (environment, database, meta database, the snapshot last checked, unique
        index databases by name) of this table once the shard is open in this process: the
        point get's and unique lookup's fast path (``point_get``). Cleared after fork and on
        close."""

    def reroute(self, slot_map: SlotMap) -> None:
        """Route by ``slot_map`` from now on (a newer map the client adopted)."""
        if slot_map.shards > len(self.local):
            self.local = self.local + [None] * (slot_map.shards - len(self.local))
        route = TableRoute(self.table, slot_map)
        self.shard = route.shard
        self.route = route

    def forget_local(self) -> None:
        """Drop the handles of this process's open shards (after fork, on close)."""
        self.local = [None] * len(self.local)


class ClientTables(dict[Any, ClientTable]):
    """``Table``, table name or table UUID -> ``ClientTable``; UnknownTable naming the known
    tables for anything else."""

    def __init__(self, schema: Schema, routes: SlotRoutes | SlotMap) -> None:
        super().__init__()
        self.schema = schema
        if isinstance(routes, SlotMap):
            routes = SlotRoutes(0, routes)
        self.routes = routes
        """The client's current slot map, which the tables' routes follow."""
        self._by_tid: dict[bytes, ClientTable] = {}
        for t in schema.tables.values():
            ct = self[t] = self[t.name] = self[t.table_id] = ClientTable(t, routes.map)
            self._by_tid[ct.tid] = ct
        routes.listen(self._reroute)

    def _reroute(self, slot_map: SlotMap) -> None:
        for ct in self.each():
            ct.reroute(slot_map)

    def shard_of_op(self, op: list[Any]) -> int:
        """The shard an encoded write op ``[code, table id, key bytes, arg]`` goes to under
        the current map."""
        ct = self._by_tid[op[1]]
        kb = op[2]
        return ct.shard(ct.kdec(kb) if ct.route.needs_key else None, kb)

    def __missing__(self, ref: Any) -> ClientTable:
        raise UnknownTable(
            f"no table {getattr(ref, 'name', ref)!r} in schema {self.schema.name!r}",
            hint=f"known tables: {', '.join(sorted(self.schema.tables))}",
        )

    def each(self) -> list[ClientTable]:
        """Every table once."""
        return list({id(ct): ct for ct in self.values()}.values())
