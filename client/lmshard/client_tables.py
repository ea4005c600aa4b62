"""The schema's tables as a client encodes and routes them.

A ``ClientTable`` is the schema's ``BoundTable`` (key and value encoders, decoders) without an
environment of its own (``db`` is None: a client reads many shards, each has its own handles,
kept in ``local``), plus the table's ``TableRoute`` and its 16-byte wire id. ``ClientTables``
finds one by ``Table``, name or UUID, and names the known tables when it does not.
"""

from __future__ import annotations

from typing import Any

from lmshard.errors import UnknownTable
from lmshard.routing import KeyRouter, SlotMap, TableRoute
from lmshard.schema import Schema, Table
from lmshard.txn import BoundTable


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
        self.local: list[tuple[Any, Any] | None] = [None] * slot_map.shards
        """Per shard, (environment, database) of this table once the shard is open in this
        process: the point get's fast path. Cleared after fork and on close."""

    def forget_local(self) -> None:
        """Drop the handles of this process's open shards (after fork, on close)."""
        self.local = [None] * len(self.local)


class ClientTables(dict[Any, ClientTable]):
    """``Table``, table name or table UUID -> ``ClientTable``; UnknownTable naming the known
    tables for anything else."""

    def __init__(self, schema: Schema, slot_map: SlotMap) -> None:
        super().__init__()
        self.schema = schema
        for t in schema.tables.values():
            self[t] = self[t.name] = self[t.table_id] = ClientTable(t, slot_map)

    def __missing__(self, ref: Any) -> ClientTable:
        raise UnknownTable(
            f"no table {getattr(ref, 'name', ref)!r} in schema {self.schema.name!r}",
            hint=f"known tables: {', '.join(sorted(self.schema.tables))}",
        )

    def each(self) -> list[ClientTable]:
        """Every table once."""
        return list({id(ct): ct for ct in self.values()}.values())
