"""A schema's tables bound to one open LMDB environment: database handles and hot-path functions.

``bind_tables`` opens every table and index database of a schema; the resulting ``TableMap``
finds a ``BoundTable`` by table name, ``Table`` object or table UUID (a ``TableRef``), and by
the ``BoundTable`` itself (the shard owner passes on the one it validated a request with).
Transactions (``lmshard.txn``), the embedded store, the shard owner and the reader pool all
look tables up through it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from lmshard.errors import KeyEncodingError, NullIndexValue, UnknownIndex, UnknownTable
from lmshard.index_values import encode_index_value
from lmshard.schema import Index, Schema, Table

TableRef = Table | str | uuid.UUID
"""How the data API names a table: its ``Table`` object, its name, or its UUID."""


class BoundIndex:
    """An index resolved against one open environment."""

    __slots__ = ("index", "name", "db", "fn", "unique", "nullable")

    def __init__(self, index: Index, db: Any) -> None:
        self.index = index
        self.name = index.name
        self.db = db
        self.fn = index.fn
        self.unique = index.unique
        self.nullable = index.nullable

    def encode(self, value: Any) -> bytes | None:
        """The index entry key for a row value, or None when a nullable index skips it."""
        try:
            iv = self.fn(value)
        except Exception as exc:
            raise KeyEncodingError(
                f"index function {self.index.table.name}.{self.name} failed on the value: "
                f"{type(exc).__name__}: {exc}",
                hint="make the index function accept every value stored in the table",
            ) from exc
        if iv is None:
            if self.nullable:
                return None
            raise NullIndexValue(
                f"index {self.index.table.name}.{self.name} got None for a row"
            )
        return encode_index_value(iv)


class BoundTable:
    """A table resolved against one open environment: database handles and hot-path functions."""

    __slots__ = (
        "table", "name", "db", "kenc", "kdec", "kprefix", "dumps", "loads", "indexes", "by_name",
        "any_width", "tid",
    )

    def __init__(self, table: Table, db: Any, index_dbs: dict[str, Any]) -> None:
        self.table = table
        self.name = table.name
        self.tid = table.table_id.bytes
        self.db = db
        self.kenc = table.key.encode
        self.kdec = table.key.decode
        self.kprefix = table.key.encode_prefix
        self.any_width = table.key.any_width
        self.dumps = table.value.dumps
        self.loads = table.value.loads
        self.indexes = tuple(BoundIndex(ix, index_dbs[name]) for name, ix in table.indexes.items())
        self.by_name = {bi.name: bi for bi in self.indexes}

    def index(self, name: str) -> BoundIndex:
        """The bound index ``name``; UnknownIndex naming the table's indexes if it has none such."""
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownIndex(
                f"table {self.name!r} has no index {name!r}",
                hint=f"its indexes: {', '.join(self.by_name) or '(none)'}",
            ) from None


class TableMap(dict[Any, BoundTable]):
    """Table name, ``Table`` object or table UUID -> ``BoundTable``, with a helpful miss."""

    def __init__(self, schema: Schema, bound: list[BoundTable]) -> None:
        super().__init__()
        self.schema = schema
        self.by_tid: dict[bytes, BoundTable] = {b.table.table_id.bytes: b for b in bound}
        for b in bound:
            self[b] = b
            self[b.name] = b
            self[b.table] = b
            self[b.table.table_id] = b

    def __missing__(self, ref: Any) -> BoundTable:
        if isinstance(ref, Table):
            raise UnknownTable(
                f"table {ref.name!r} is not in schema {self.schema.name!r} of this store",
                hint="open the store with the schema that declares the table",
            )
        raise UnknownTable(
            f"no table {ref!r} in schema {self.schema.name!r}",
            hint=f"known tables: {', '.join(sorted(self.schema.tables)) or '(none)'}",
        )


def bind_tables(schema: Schema, open_db: Callable[[bytes, bool], Any]) -> TableMap:
    """Open (or create) every table and index database of a schema."""
    bound = []
    for t in schema.tables.values():
        index_dbs = {name: open_db(ix.db_name, not ix.unique) for name, ix in t.indexes.items()}
        bound.append(BoundTable(t, open_db(t.db_name, False), index_dbs))
    return TableMap(schema, bound)


BoundRef = TableRef | BoundTable
"""What a ``TableMap`` resolves: a ``TableRef``, or a ``BoundTable`` already looked up."""
