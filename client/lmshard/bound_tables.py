"""A schema's tables bound to one open LMDB environment: database handles and hot-path functions.

``bind_tables`` opens every table and index database of a schema; the resulting ``TableMap``
finds a ``BoundTable`` by table name, ``Table`` object or table UUID (a ``TableRef``), and by
the ``BoundTable`` itself (the shard owner passes on the one it validated a request with).
Transactions (``lmshard.txn``), the embedded store, the shard owner and the reader pool all
look tables up through it.

Rows that expire: a table declared with ``ttl`` stores each row as an 8-byte big-endian expiry
time (milliseconds since the epoch, wall clock; all ones: never) followed by the codec's
bytes, and
keeps an expiry index ``x/<table uuid>`` of (expiry + row key) -> empty for its rows that have
an expiry. The writer that encodes a put stamps the expiry (now + ttl), so it travels in the
row through restarts, backups and restores. A plain table's rows are the codec's bytes alone.
Reads of such a table pass what they found through ``live_row`` (an expired row reads as
absent until the owner's sweep deletes it); its ``BoundTable.loads`` skips the header and its
``dumps`` stamps the default ttl, so code that moves stored bytes need not know the layout.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable
from typing import Any

from lmshard.errors import KeyEncodingError, NullIndexValue, TTLError, UnknownIndex, UnknownTable
from lmshard.index_values import encode_index_value
from lmshard.schema import Index, Schema, Table, ttl_seconds

EXPIRY_SIZE = 8
"""Bytes of the expiry header before the codec's bytes, in rows of a table with ttl."""
NO_EXPIRY = b"\xff" * EXPIRY_SIZE
"""The header of a row that never expires: the latest time there is, so that a row has
expired exactly when its bytes sort below ``_cutoff()`` (one bytes comparison per read)."""
_NEVER = 2**64 - 1
_unpack_expiry = struct.Struct(">Q").unpack_from


class _Cutoff:
    """The header of a row expiring just after the current millisecond, recomputed when the
    wall clock leaves that millisecond (either way: a clock stepped back is followed)."""

    __slots__ = ("since", "until", "header")

    def __init__(self) -> None:
        self.since = self.until = 0.0
        self.header = b""

    def at(self, t: float) -> bytes:
        ms = int(t * 1000)
        self.since, self.until = ms / 1000, (ms + 1) / 1000
        self.header = (ms + 1).to_bytes(EXPIRY_SIZE, "big")
        return self.header


_CUTOFF = _Cutoff()


def now_ms() -> int:
    """The wall clock in milliseconds since the epoch, as expiry times count."""
    return int(time.time() * 1000)


def expiry_of(data: bytes | memoryview) -> int:
    """The expiry time (ms since the epoch, 0: never) of a stored row of a table with ttl."""
    expiry = int(_unpack_expiry(data)[0])
    return 0 if expiry == _NEVER else expiry


def _cutoff() -> bytes:
    """Stored rows whose bytes sort below this have expired (``_Cutoff``)."""
    c, t = _CUTOFF, time.time()
    return c.header if c.since <= t < c.until else c.at(t)


def live_row(data: Any) -> Any:
    """``data`` (stored bytes of a row of a table with ttl, or None) if it is a row a read may
    return; None for an expired row. Every read of such a table goes through here."""
    if data is not None and bytes(data[:EXPIRY_SIZE]) < _cutoff():
        return None
    return data


def stamped(expiry: int, payload: bytes) -> bytes:
    """A stored row of a table with ttl: the expiry header (``expiry`` 0: never), then the
    codec's bytes."""
    return (expiry or _NEVER).to_bytes(EXPIRY_SIZE, "big") + payload


def expiry_entry(expiry: int, key: bytes) -> bytes:
    """The key of a row's entry in its table's expiry index (the entry's value is empty)."""
    return expiry.to_bytes(EXPIRY_SIZE, "big") + key

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
        "any_width", "tid", "expiring", "expiry_db", "value",
    )

    def __init__(self, table: Table, db: Any, index_dbs: dict[str, Any],
                 expiry_db: Any = None) -> None:
        self.table = table
        self.name = table.name
        self.tid = table.table_id.bytes
        self.db = db
        self.kenc = table.key.encode
        self.kdec = table.key.decode
        self.kprefix = table.key.encode_prefix
        self.any_width = table.key.any_width
        self.expiring = table.ttl is not None
        """Whether rows carry an expiry (the table has ``ttl``): reads check it."""
        self.expiry_db = expiry_db
        """The expiry index's database (None for a plain table, and on the client)."""
        self.dumps: Callable[[Any], bytes]
        """A value as the row stores it (the default ttl stamped, for a table with ttl)."""
        self.loads: Callable[[Any], Any]
        """Stored row bytes as the value (the expiry header skipped)."""
        self.value: Callable[[Any, Any], Any]
        """Stored row bytes as read (None: no row) as the value, ``default`` for no row or
        (``live_row``'s check, fused with decoding for the point gets) an expired one."""
        if self.expiring:
            self.dumps, self.loads, self.value = _expiring_codec(table)
        else:
            self.value = _plain_value(table.value.loads)
            self.dumps = table.value.dumps
            self.loads = table.value.loads
        self.indexes = tuple(BoundIndex(ix, index_dbs[name]) for name, ix in table.indexes.items())
        self.by_name = {bi.name: bi for bi in self.indexes}

    def encode(self, value: Any, ttl: Any = None) -> bytes:
        """A value as the row stores it, expiring ``ttl`` seconds from now (None: the table's
        default); TTLError for a bad ttl or a table without ttl."""
        if ttl is None:
            return self.dumps(value)
        if not self.expiring:
            raise TTLError(f"table {self.name!r} was declared without ttl: its rows cannot "
                           "expire", hint="declare it with schema.table(..., ttl=0) (or a "
                           "default ttl) under a new table_id")
        ms = round(ttl_seconds(ttl, f"put to {self.name!r}") * 1000)
        return stamped(now_ms() + ms, self.table.value.dumps(value))

    def payload(self, data: Any) -> Any:
        """The codec's bytes of stored row bytes (what ``value_hash`` is taken of)."""
        return data[EXPIRY_SIZE:] if self.expiring else data

    def check_expiring(self, what: str) -> None:
        """TTLError unless the table's rows carry an expiry."""
        if not self.expiring:
            raise TTLError(f"{what}: table {self.name!r} was declared without ttl, its rows "
                           "never expire")

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
        self.expiring = [b for b in bound if b.expiring]
        """The tables whose rows carry an expiry (the owner's sweep walks their indexes)."""
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


def _plain_value(loads: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    def value(data: Any, default: Any) -> Any:
        return default if data is None else loads(data)
    return value


def _expiring_codec(table: Table) -> tuple[Callable[[Any], bytes], Callable[[Any], Any],
                                           Callable[[Any, Any], Any]]:
    """(dumps, loads, value) of stored rows of a table with ttl: the header, then the codec's
    bytes."""
    dumps, loads = table.value.dumps, table.value.loads
    default_ms = round((table.ttl or 0) * 1000)

    if default_ms:
        def dumps_row(value: Any) -> bytes:
            return (int(time.time() * 1000) + default_ms).to_bytes(EXPIRY_SIZE, "big") \
                + dumps(value)
    else:
        def dumps_row(value: Any) -> bytes:
            return NO_EXPIRY + dumps(value)

    def loads_row(data: Any) -> Any:
        return loads(data[EXPIRY_SIZE:])

    clock, cutoff = time.time, _CUTOFF

    def value(data: Any, default: Any) -> Any:
        if data is None:
            return default
        t = clock()
        # live_row's check inlined: the point get's hot path (see _Cutoff)
        if data < (cutoff.header if cutoff.since <= t < cutoff.until else cutoff.at(t)):
            return default
        return loads(data[EXPIRY_SIZE:])

    return dumps_row, loads_row, value


def bind_tables(schema: Schema, open_db: Callable[[bytes, bool], Any]) -> TableMap:
    """Open (or create) every table and index database of a schema (and the expiry index of
    each table with ttl)."""
    bound = []
    for t in schema.tables.values():
        index_dbs = {name: open_db(ix.db_name, not ix.unique) for name, ix in t.indexes.items()}
        expiry_db = open_db(t.expiry_db_name, False) if t.ttl is not None else None
        bound.append(BoundTable(t, open_db(t.db_name, False), index_dbs, expiry_db))
    return TableMap(schema, bound)


BoundRef = TableRef | BoundTable
"""What a ``TableMap`` resolves: a ``TableRef``, or a ``BoundTable`` already looked up."""
