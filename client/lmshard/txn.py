"""Read and write transactions over one LMDB environment's tables and indexes.

This is the one place that knows how rows and index entries are laid out in LMDB: each table
is a named database ``t/<table uuid>``; each index is ``i/<table uuid>/<index name>``, mapping
the encoded index value to the row key (a dupsort database when the index is not unique).
The embedded ``Store``, the shard owner and the client's local reads all go through here.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from lmshard import hints
from lmshard.errors import (
    ConflictError,
    KeyEncodingError,
    NullIndexValue,
    TransactionError,
    UniqueViolation,
    UnknownIndex,
    UnknownTable,
)
from lmshard.keys import encode_index_prefix, encode_index_value
from lmshard.schema import Index, Schema, Table

TableRef = Table | str | uuid.UUID
LARGE_VALUE = hints.LARGE_VALUE_WARNING


def value_hash(data: bytes) -> bytes:
    """The digest a compare-and-set can expect instead of the whole stored value."""
    return hashlib.blake2b(data, digest_size=16).digest()


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


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
        "any_width",
    )

    def __init__(self, table: Table, db: Any, index_dbs: dict[str, Any]) -> None:
        self.table = table
        self.name = table.name
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
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownIndex(
                f"table {self.name!r} has no index {name!r}",
                hint=f"its indexes: {', '.join(self.by_name) or '(none)'}",
            ) from None


class TableMap(dict):
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


class _Ended:
    """Stands in for the LMDB transaction once a block has ended, with a clear error."""

    def __getattr__(self, name: str) -> Any:
        raise TransactionError(
            "this transaction has ended",
            hint="use a transaction only inside its with-block",
        )


ENDED = _Ended()


class ReadTxn:
    """Reads inside one LMDB snapshot. Use it as a context manager, only inside its block."""

    __slots__ = ("_txn", "_tables", "__weakref__")

    def __init__(self, txn: Any, tables: TableMap) -> None:
        self._txn = txn
        self._tables = tables

    @property
    def txn_id(self) -> int:
        """The LMDB transaction id this snapshot reads (the last committed write txn)."""
        return self._txn.id()

    def get(self, table: TableRef, key: Any, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none."""
        b = self._tables[table]
        data = self._txn.get(b.kenc(key), db=b.db)
        return default if data is None else b.loads(data)

    def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        """Values for several keys in order, ``default`` where a key is missing."""
        b = self._tables[table]
        get, db, kenc, loads = self._txn.get, b.db, b.kenc, b.loads
        out = []
        for key in keys:
            data = get(kenc(key), db=db)
            out.append(default if data is None else loads(data))
        return out

    def get_raw(self, table: TableRef, key_bytes: bytes) -> bytes | None:
        """The stored bytes under an already encoded key."""
        return self._txn.get(key_bytes, db=self._tables[table].db)

    def exists(self, table: TableRef, key: Any) -> bool:
        b = self._tables[table]
        return self._txn.get(b.kenc(key), db=b.db) is not None

    def _bounds(
        self, b: BoundTable, prefix: Any, start: Any, end: Any
    ) -> tuple[bytes | None, bytes | None]:
        return key_bounds(b, prefix, start, end)

    def scan(
        self,
        table: TableRef,
        prefix: Any = None,
        start: Any = None,
        end: Any = None,
        reverse: bool = False,
        limit: int | None = None,
        where: Callable[[Any], bool] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Yield (key, value) in key order; ``start`` inclusive, ``end`` exclusive."""
        b = self._tables[table]
        lo, hi = self._bounds(b, prefix, start, end)
        items = _range_items(self._txn.cursor(db=b.db), lo, hi, reverse)
        kdec, loads = b.kdec, b.loads
        if where is None and limit is None:
            return ((kdec(k), loads(v)) for k, v in items)
        if where is not None:
            rows = int(self._txn.stat(b.db)["entries"])
            if rows >= hints.INDEX_HINT_MIN_ROWS:
                decoded = ((kdec(k), loads(v)) for k, v in items)
                return hints.watch_where_scan(decoded, b.table, where, limit, rows, self)
        return filtered_rows(items, kdec, loads, where, limit)

    def scan_raw(
        self, table: TableRef, lo: bytes | None = None, hi: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield encoded (key, value) pairs with ``lo <= key < hi``."""
        return _range_items(self._txn.cursor(db=self._tables[table].db), lo, hi, reverse)

    def count(
        self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None
    ) -> int:
        """Rows in the table, or in a key range or prefix."""
        b = self._tables[table]
        if prefix is None and start is None and end is None:
            return int(self._txn.stat(b.db)["entries"])
        lo, hi = self._bounds(b, prefix, start, end)
        return sum(1 for _ in _range_keys(self._txn.cursor(db=b.db), lo, hi))

    def lookup_keys(
        self, table: TableRef, index: str, value: Any, prefix: bool = False
    ) -> list[bytes]:
        """Encoded row keys whose index value equals ``value`` (or starts with it)."""
        if value is None:
            self._tables[table].index(index)
            return []
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        return self.lookup_keys_raw(table, index, ivb, prefix)

    def lookup_keys_raw(
        self, table: TableRef, index: str, ivb: bytes, prefix: bool = False
    ) -> list[bytes]:
        """Row keys for an encoded index value, or for every value starting with it."""
        bi = self._tables[table].index(index)
        cur = self._txn.cursor(db=bi.db)
        if not prefix:
            if bi.unique:
                rk = self._txn.get(ivb, db=bi.db)
                return [] if rk is None else [rk]
            if not cur.set_key(ivb):
                return []
            return list(cur.iternext_dup(keys=False, values=True))
        return [v for _, v in _range_items(cur, ivb, prefix_end(ivb), False)]

    def lookup(
        self, table: TableRef, index: str, value: Any, prefix: bool = False
    ) -> list[tuple[Any, Any]]:
        """Rows whose index value equals ``value``; with ``prefix=True`` a composite index
        matches on its leading elements (a tuple) and a str/bytes index on a string prefix."""
        b = self._tables[table]
        get, db, kdec, loads = self._txn.get, b.db, b.kdec, b.loads
        if not prefix and value is not None:
            bi = b.index(index)
            if bi.unique:  # the common case, kept to two LMDB gets
                rk = get(encode_index_value(value), db=bi.db)
                if rk is None:
                    return []
                data = get(rk, db=db)
                return [] if data is None else [(kdec(rk), loads(data))]
        out = []
        for rk in self.lookup_keys(table, index, value, prefix):
            data = get(rk, db=db)
            if data is not None:
                out.append((kdec(rk), loads(data)))
        return out

    def index_count(self, table: TableRef, index: str) -> int:
        """Entries in an index (rows indexed, for a non-unique index counting every row)."""
        return int(self._txn.stat(self._tables[table].index(index).db)["entries"])

    def marshal(self, table: TableRef, key: Any) -> dict[str, Any] | None:
        """A JSON-safe view of one row and its index values, for debugging; None if missing."""
        b = self._tables[table]
        kb = b.kenc(key)
        data = self._txn.get(kb, db=b.db)
        if data is None:
            return None
        t = b.table
        value = b.loads(data)
        indexes: dict[str, Any] = {}
        for bi in b.indexes:
            ivb = bi.encode(value)
            indexes[bi.name] = None if ivb is None else _json_safe(bi.fn(value))
        return {
            "table": t.name,
            "table_id": str(t.table_id),
            "key": t.key.to_json(b.kdec(kb)),
            "key_hex": kb.hex(),
            "value": t.value.to_json(value),
            "size": len(data),
            "indexes": indexes,
        }


def key_bounds(
    t: Any, prefix: Any, start: Any, end: Any
) -> tuple[bytes | None, bytes | None]:
    """Encoded ``lo <= key < hi`` for a scan of table ``t`` (anything with ``kenc`` and
    ``kprefix``): ``start`` inclusive, ``end`` exclusive, narrowed to ``prefix``."""
    lo = t.kenc(start) if start is not None else None
    hi = t.kenc(end) if end is not None else None
    if prefix is not None:
        pb = t.kprefix(prefix)
        pe = prefix_end(pb)
        lo = pb if lo is None or pb > lo else lo
        if pe is not None and (hi is None or pe < hi):
            hi = pe
    return lo, hi


def index_prefix(value: Any) -> bytes:
    """Encoded prefix for an index lookup by prefix: a tuple's leading elements, or the
    beginning of a str/bytes value."""
    if isinstance(value, tuple | list):
        return encode_index_prefix(tuple(value))
    full = encode_index_value(value)
    if isinstance(value, str | bytes):
        return full[:-1]  # drop the terminator: a string prefix, not a whole string
    return full


def _json_safe(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_json_safe(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def _range_items(
    cur: Any, lo: bytes | None, hi: bytes | None, reverse: bool
) -> Iterator[tuple[bytes, bytes]]:
    if not reverse:
        if lo is None:
            positioned = cur.first()
        else:
            positioned = cur.set_range(lo)
        if not positioned:
            return iter(())
        if hi is None:
            return cur.iternext()
        return _until(cur.iternext(), hi)
    if hi is None:
        positioned = cur.last()
    elif cur.set_range(hi):
        positioned = cur.prev()
    else:
        positioned = cur.last()
    if not positioned:
        return iter(())
    if lo is None:
        return cur.iterprev()
    return _down_to(cur.iterprev(), lo)


def _range_keys(cur: Any, lo: bytes | None, hi: bytes | None) -> Iterator[bytes]:
    positioned = cur.first() if lo is None else cur.set_range(lo)
    if not positioned:
        return
    for k in cur.iternext(keys=True, values=False):
        if hi is not None and k >= hi:
            return
        yield k


def _until(items: Iterator[tuple[bytes, bytes]], hi: bytes) -> Iterator[tuple[bytes, bytes]]:
    for k, v in items:
        if k >= hi:
            return
        yield k, v


def _down_to(items: Iterator[tuple[bytes, bytes]], lo: bytes) -> Iterator[tuple[bytes, bytes]]:
    for k, v in items:
        if k < lo:
            return
        yield k, v


def filtered_rows(
    items: Iterator[tuple[bytes, bytes]],
    kdec: Callable[[bytes], Any],
    loads: Callable[[bytes], Any],
    where: Callable[[Any], bool] | None,
    limit: int | None,
) -> Iterator[tuple[Any, Any]]:
    if limit is not None and limit <= 0:
        return
    n = 0
    for k, v in items:
        value = loads(v)
        if where is not None and not where(value):
            continue
        yield kdec(k), value
        n += 1
        if limit is not None and n >= limit:
            return


class WriteTxn(ReadTxn):
    """Reads and writes inside one LMDB write transaction, indexes kept in step with rows.

    Each write checks everything that can fail (key and value encoding, index values, unique
    constraints) before it touches the database, so a write that raises changes nothing.
    """

    __slots__ = ("_strict",)

    def __init__(self, txn: Any, tables: TableMap, *, strict: bool = False) -> None:
        super().__init__(txn, tables)
        self._strict = strict

    def put(self, table: TableRef, key: Any, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any earlier value."""
        self._put(table, key, value)

    def _put(self, table: TableRef, key: Any, value: Any) -> None:
        b = self._tables[table]
        kb = b.kenc(key)
        vb = b.dumps(value)
        if len(vb) >= LARGE_VALUE:
            hints.large_value_warning(b.name, len(vb))
        if b.indexes:
            self._put_indexed(b, kb, vb, value)
        else:
            self._txn.put(kb, vb, db=b.db)

    def put_raw(self, table: TableRef, key_bytes: bytes, value_bytes: bytes) -> None:
        """Store already encoded bytes (the shard owner's path); indexes are still kept."""
        b = self._tables[table]
        if len(value_bytes) >= LARGE_VALUE:
            hints.large_value_warning(b.name, len(value_bytes))
        if b.indexes:
            self._put_indexed(b, key_bytes, value_bytes, b.loads(value_bytes))
        else:
            self._txn.put(key_bytes, value_bytes, db=b.db)

    def _put_indexed(self, b: BoundTable, kb: bytes, vb: bytes, value: Any) -> None:
        txn = self._txn
        new = [(bi, bi.encode(value)) for bi in b.indexes]
        for bi, _ in new:
            if bi.index.shard_key is not None:
                _check_index_shard_key(b, bi, kb, value)
        for bi, ivb in new:
            if bi.unique and ivb is not None:
                holder = txn.get(ivb, db=bi.db)
                if holder is not None and holder != kb:
                    raise UniqueViolation(
                        f"{b.name}.{bi.name}: the value {_json_safe(bi.fn(value))!r} is already "
                        f"used by the row with key {b.table.key.to_json(b.kdec(holder))!r}"
                    )
        old = txn.replace(kb, vb, db=b.db)
        old_value = b.loads(old) if old is not None else None
        for bi, ivb in new:
            if old is not None:
                oivb = _old_entry(bi, old_value)
                if oivb == ivb:
                    continue
                if oivb is not None:
                    _drop_entry(txn, bi, oivb, kb)
            if ivb is not None:
                txn.put(ivb, kb, db=bi.db)

    def delete(self, table: TableRef, key: Any) -> bool:
        """Remove the row under ``key`` and its index entries; False if there was none."""
        b = self._tables[table]
        return self._delete(b, b.kenc(key))

    def delete_raw(self, table: TableRef, key_bytes: bytes) -> bool:
        """Remove the row under an already encoded key (the shard owner's path)."""
        return self._delete(self._tables[table], key_bytes)

    def _delete(self, b: BoundTable, key_bytes: bytes) -> bool:
        if not b.indexes:
            return bool(self._txn.delete(key_bytes, db=b.db))
        old = self._txn.pop(key_bytes, db=b.db)
        if old is None:
            return False
        old_value = b.loads(old)
        for bi in b.indexes:
            oivb = _old_entry(bi, old_value)
            if oivb is not None:
                _drop_entry(self._txn, bi, oivb, key_bytes)
        return True

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        """Add ``delta`` to the integer stored under ``key`` (missing counts as 0)."""
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise TransactionError(
                f"incr delta must be an int, not {type(delta).__name__}", hint="pass an int"
            )
        current = self.get(table, key, 0)
        if not isinstance(current, int) or isinstance(current, bool):
            raise ConflictError(
                f"incr on {self._tables[table].name} found a {type(current).__name__}, "
                "not an int",
                hint="incr works on rows that hold an int",
            )
        new = current + delta
        self._put(table, key, new)
        return new

    def cas(
        self,
        table: TableRef,
        key: Any,
        value: Any,
        expected: Any = None,
        *,
        expected_hash: bytes | None = None,
    ) -> bool:
        """Put ``value`` only if the row still holds ``expected`` (None: the row must not
        exist), or, with ``expected_hash``, stored bytes with that ``value_hash``.

        Returns False when the row differs; in a batch (``strict``) raises ConflictError so
        the whole batch is left out.
        """
        b = self._tables[table]
        data = self._txn.get(b.kenc(key), db=b.db)
        if expected_hash is not None:
            ok = data is not None and value_hash(data) == expected_hash
        elif expected is None:
            ok = data is None
        else:
            ok = data is not None and b.loads(data) == expected
        if not ok:
            if self._strict:
                raise ConflictError(
                    f"compare-and-set on {b.name} key {b.table.key.to_json(key)!r}: "
                    "the stored value is not the expected one"
                )
            return False
        self._put(table, key, value)
        return True

    def incr_raw(self, table: TableRef, key_bytes: bytes, delta: int) -> int:
        """``incr`` on an already encoded key (the shard owner's path)."""
        b = self._tables[table]
        return self.incr(table, b.kdec(key_bytes), delta)

    def cas_raw(
        self, table: TableRef, key_bytes: bytes, value_bytes: bytes,
        expected_bytes: bytes | None, expected_hash: bytes | None,
    ) -> bool:
        """``cas`` with encoded key, value and expectation (the shard owner's path)."""
        b = self._tables[table]
        data = self._txn.get(key_bytes, db=b.db)
        if expected_hash is not None:
            ok = data is not None and value_hash(data) == expected_hash
        elif expected_bytes is None:
            ok = data is None
        else:
            ok = data is not None and (
                data == expected_bytes or b.loads(data) == b.loads(expected_bytes)
            )
        if not ok:
            if self._strict:
                raise ConflictError(
                    f"compare-and-set on {b.name} key "
                    f"{b.table.key.to_json(b.kdec(key_bytes))!r}: "
                    "the stored value is not the expected one"
                )
            return False
        self.put_raw(table, key_bytes, value_bytes)
        return True

    def purge(self, table: TableRef) -> int:
        """Drop every row and index entry of a table; returns the number of rows dropped."""
        b = self._tables[table]
        n = int(self._txn.stat(b.db)["entries"])
        self._txn.drop(b.db, delete=False)
        for bi in b.indexes:
            self._txn.drop(bi.db, delete=False)
        return n


def _check_index_shard_key(b: BoundTable, bi: BoundIndex, kb: bytes, value: Any) -> None:
    row_shard_key = b.table.shard_key(b.kdec(kb))  # type: ignore[misc]
    index_shard_key = bi.index.shard_key(value)  # type: ignore[misc]
    if encode_index_value(row_shard_key) != encode_index_value(index_shard_key):
        raise KeyEncodingError(
            f"index {b.name}.{bi.name}: its shard_key gives {index_shard_key!r} for this row, "
            f"the table's shard_key gives {row_shard_key!r}",
            hint="the index's shard_key must give the row's own shard key, or uniqueness "
            "cannot be checked on one shard",
        )


def _old_entry(bi: BoundIndex, old_value: Any) -> bytes | None:
    # The index function may have changed since the old row was written; an old value it can
    # no longer index has no entry to remove.
    try:
        return bi.encode(old_value)
    except KeyEncodingError:
        return None


def _drop_entry(txn: Any, bi: BoundIndex, ivb: bytes, kb: bytes) -> None:
    if bi.unique:
        if txn.get(ivb, db=bi.db) == kb:
            txn.delete(ivb, db=bi.db)
    else:
        txn.delete(ivb, kb, db=bi.db)
