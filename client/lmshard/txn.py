"""Read and write transactions over one LMDB environment's tables and indexes.

This is the one place that knows how rows and index entries are laid out in LMDB: each table
is a named database ``t/<table uuid>``; each index is ``i/<table uuid>/<index name>``, mapping
the encoded index value to the row key (a dupsort database when the index is not unique).
A table declared with ``ttl`` stores an expiry before each row's codec bytes and keeps an
expiry index ``x/<table uuid>`` (``lmshard.bound_tables`` describes the layout): every read
here leaves out rows whose expiry has passed, every write keeps the expiry index in step, and
``WriteTxn.expire`` deletes expired rows in expiry order (the owner's sweep).
The embedded ``Store``, the shard owner and the client's local reads all go through here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from lmshard import hints
from lmshard.bound_tables import (
    EXPIRY_SIZE,
    NO_EXPIRY,
    BoundIndex,
    BoundRef,
    BoundTable,
    TableMap,
    TableRef,
    bind_tables,
    expiry_entry,
    expiry_of,
    live_row,
    now_ms,
    stamped,
)
from lmshard.errors import ConflictError, KeyEncodingError, TransactionError, UniqueViolation
from lmshard.index_values import encode_index_value, index_prefix
from lmshard.key_ranges import filtered_rows, key_bounds, prefix_end, range_items, range_keys

__all__ = [
    "ENDED",
    "LARGE_VALUE",
    "ReadTxn",
    "WriteTxn",
    "value_hash",
    # Homes elsewhere, importable from here as they always were: tables bound to an environment
    # (lmshard.bound_tables), key ranges (lmshard.key_ranges), index prefixes
    # (lmshard.index_values).
    "BoundTable",
    "TableMap",
    "TableRef",
    "bind_tables",
    "filtered_rows",
    "index_prefix",
    "key_bounds",
    "prefix_end",
]

LARGE_VALUE = hints.LARGE_VALUE_WARNING
EXPIRE_STEP = 1000
"""Most expired rows one ``WriteTxn.expire`` deletes (one short step of the owner's sweep)."""


def value_hash(data: bytes) -> bytes:
    """The digest a compare-and-set can expect instead of the whole stored value."""
    return hashlib.blake2b(data, digest_size=16).digest()


class _Ended:
    """Stands in for the LMDB transaction once a block has ended, with a clear error."""

    def __getattr__(self, name: str) -> Any:
        raise TransactionError(
            "this transaction has ended",
            hint="use a transaction only inside its with-block",
        )


ENDED = _Ended()


class ReadTxn:
    """Reads inside one LMDB snapshot, over the tables of one environment.

    ``Store.read()`` hands one out for the length of its block; use it only inside the block.
    """

    __slots__ = ("_txn", "_tables", "__weakref__")

    def __init__(self, txn: Any, tables: TableMap) -> None:
        self._txn = txn
        self._tables = tables

    @property
    def txn(self) -> Any:
        """The underlying ``lmdb.Transaction`` (for raw LMDB access in the same snapshot)."""
        return self._txn

    @property
    def tables(self) -> TableMap:
        """The tables this transaction reads, bound to its environment."""
        return self._tables

    @property
    def txn_id(self) -> int:
        """The LMDB transaction id this snapshot reads (the last committed write txn)."""
        return int(self._txn.id())

    def end(self) -> None:
        """Abort the LMDB transaction; any later use raises TransactionError."""
        txn, self._txn = self._txn, ENDED
        if txn is not ENDED:
            txn.abort()

    def get(self, table: BoundRef, key: Any, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none."""
        b = self._tables[table]
        data = self._txn.get(b.kenc(key), db=b.db)
        if b.expiring:
            data = live_row(data)
        return default if data is None else b.loads(data)

    def get_many(self, table: BoundRef, keys: Any, default: Any = None) -> list[Any]:
        """Values for several keys in order, ``default`` where a key is missing."""
        b = self._tables[table]
        get, db, kenc, loads = self._txn.get, b.db, b.kenc, b.loads
        out = []
        if b.expiring:
            for key in keys:
                data = live_row(get(kenc(key), db=db))
                out.append(default if data is None else loads(data))
            return out
        for key in keys:
            data = get(kenc(key), db=db)
            out.append(default if data is None else loads(data))
        return out

    def get_raw(self, table: BoundRef, key_bytes: bytes) -> bytes | None:
        """The stored bytes under an already encoded key (None: no row, or it expired)."""
        b = self._tables[table]
        data: bytes | None = self._txn.get(key_bytes, db=b.db)
        return live_row(data) if b.expiring else data

    def exists(self, table: BoundRef, key: Any) -> bool:
        """Whether a row is stored under ``key``."""
        return self.get_raw(table, self._tables[table].kenc(key)) is not None

    def ttl(self, table: BoundRef, key: Any) -> float | None:
        """Seconds until the row under ``key`` expires; None when it never does, 0.0 when
        there is no row (or it expired). TTLError for a table declared without ttl."""
        b = self._tables[table]
        b.check_expiring("ttl")
        return seconds_left(self.get_raw(table, b.kenc(key)))

    def scan(
        self,
        table: BoundRef,
        prefix: Any = None,
        start: Any = None,
        end: Any = None,
        reverse: bool = False,
        limit: int | None = None,
        where: Callable[[Any], bool] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Yield (key, value) in key order; ``start`` inclusive, ``end`` exclusive."""
        b = self._tables[table]
        lo, hi = key_bounds(b, prefix, start, end)
        items = range_items(self._txn.cursor(db=b.db), lo, hi, reverse)
        if b.expiring:
            items = live_items(items)
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
        self, table: BoundRef, lo: bytes | None = None, hi: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield encoded (key, value) pairs with ``lo <= key < hi``."""
        b = self._tables[table]
        items = range_items(self._txn.cursor(db=b.db), lo, hi, reverse)
        return live_items(items) if b.expiring else items

    def count(
        self, table: BoundRef, prefix: Any = None, start: Any = None, end: Any = None
    ) -> int:
        """Rows in the table, or in a key range or prefix."""
        b = self._tables[table]
        if prefix is None and start is None and end is None:
            return self.count_raw(b)
        return self.count_raw(b, *key_bounds(b, prefix, start, end))

    def count_raw(self, table: BoundRef, lo: bytes | None = None, hi: bytes | None = None
                  ) -> int:
        """Rows with ``lo <= key < hi`` (None: unbounded); expired rows not counted."""
        b = self._tables[table]
        if lo is None and hi is None:
            n = int(self._txn.stat(b.db)["entries"])
            return n - self.expired_rows(b) if b.expiring else n
        if b.expiring:
            return sum(1 for _ in self.scan_raw(b, lo, hi))
        return sum(1 for _ in range_keys(self._txn.cursor(db=b.db), lo, hi))

    def expired_rows(self, table: BoundRef) -> int:
        """Rows of a table with ttl that have expired and are still stored (not yet swept),
        counted from its expiry index."""
        b = self._tables[table]
        now = now_ms()
        n = 0
        for k in self._txn.cursor(db=b.expiry_db).iternext(values=False):
            if int.from_bytes(k[:EXPIRY_SIZE], "big") > now:
                break
            n += 1
        return n

    def lookup_keys(
        self, table: BoundRef, index: str, value: Any, prefix: bool = False
    ) -> list[bytes]:
        """Encoded row keys whose index value equals ``value`` (or starts with it)."""
        if value is None:
            self._tables[table].index(index)
            return []
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        return self.lookup_keys_raw(table, index, ivb, prefix)

    def lookup_keys_raw(
        self, table: BoundRef, index: str, ivb: bytes, prefix: bool = False
    ) -> list[bytes]:
        """Row keys for an encoded index value, or for every value starting with it."""
        b = self._tables[table]
        keys = self._index_keys(b.index(index), ivb, prefix)
        if b.expiring:
            get, db = self._txn.get, b.db
            return [rk for rk in keys if live_row(get(rk, db=db)) is not None]
        return keys

    def lookup_rows_raw(
        self, table: BoundRef, index: str, ivb: bytes, prefix: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """(row key, stored bytes) of the rows ``lookup_keys_raw`` finds, in index order."""
        b = self._tables[table]
        get, db = self._txn.get, b.db
        out = []
        for rk in self._index_keys(b.index(index), ivb, prefix):
            data = get(rk, db=db)
            if b.expiring:
                data = live_row(data)
            if data is not None:
                out.append((rk, data))
        return out

    def _index_keys(self, bi: BoundIndex, ivb: bytes, prefix: bool) -> list[bytes]:
        if not prefix and bi.unique:
            rk = self._txn.get(ivb, db=bi.db)
            return [] if rk is None else [rk]
        cur = self._txn.cursor(db=bi.db)
        if not prefix:
            if not cur.set_key(ivb):
                return []
            return list(cur.iternext_dup(keys=False, values=True))
        return [v for _, v in range_items(cur, ivb, prefix_end(ivb), False)]

    def lookup(
        self, table: BoundRef, index: str, value: Any, prefix: bool = False
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
                if b.expiring:
                    data = live_row(data)
                return [] if data is None else [(kdec(rk), loads(data))]
        if value is None:
            b.index(index)
            return []
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        return [(kdec(rk), loads(data))
                for rk, data in self.lookup_rows_raw(b, index, ivb, prefix)]

    def index_count(self, table: BoundRef, index: str) -> int:
        """Entries in an index (rows indexed, for a non-unique index counting every row;
        rows expired but not yet swept included)."""
        return int(self._txn.stat(self._tables[table].index(index).db)["entries"])

    def marshal(self, table: BoundRef, key: Any) -> dict[str, Any] | None:
        """A JSON-safe view of one row and its index values, for debugging; None if missing."""
        b = self._tables[table]
        kb = b.kenc(key)
        data = self.get_raw(b, kb)
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
            **({"ttl": seconds_left(data)} if b.expiring else {}),
        }


def live_items(items: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """The (key, stored bytes) of ``items`` whose rows have not expired."""
    return ((k, v) for k, v in items if live_row(v) is not None)


def seconds_left(data: Any) -> float | None:
    """Seconds until stored row bytes (of a table with ttl) expire: None for a row without an
    expiry, 0.0 for no row (None bytes); what ``ttl()`` answers on every front end."""
    if data is None:
        return 0.0
    expiry = expiry_of(data)
    return None if expiry == 0 else max(0.0, (expiry - now_ms()) / 1000)


def _json_safe(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_json_safe(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


class Snapshot:
    """A read transaction as a context: the ``ReadTxn``, ended at the end of the block (a
    class, not a generator: every local read that is not a point get begins one). ``ReadTxn``
    is not a context itself: ``with WriteTxn(...)`` would then end writes unseen."""

    __slots__ = ("r",)

    def __init__(self, r: ReadTxn) -> None:
        self.r = r

    def __enter__(self) -> ReadTxn:
        return self.r

    def __exit__(self, *exc: object) -> None:
        self.r.end()


class WriteTxn(ReadTxn):
    """Reads and writes inside one LMDB write transaction, indexes kept in step with rows.

    Each write checks everything that can fail (key and value encoding, index values, unique
    constraints) before it touches the database, so a write that raises changes nothing.
    With ``log`` (a list), every change made is appended to it as ``(table id, key, value or
    None)``, encoded: what the change log records (``lmshard.changes``).
    """

    __slots__ = ("_strict", "_log")

    def __init__(self, txn: Any, tables: TableMap, *, strict: bool = False,
                 log: list[Any] | None = None) -> None:
        super().__init__(txn, tables)
        self._strict = strict
        self._log = log

    @property
    def log(self) -> list[Any] | None:
        """The changes made so far, when recording them (``log``); else None."""
        return self._log

    def put(self, table: BoundRef, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any earlier value; on a table with ttl
        it expires ``ttl`` seconds from now (None: the table's default)."""
        b = self._tables[table]
        kb = b.kenc(key)
        vb = b.dumps(value) if ttl is None else b.encode(value, ttl)
        if len(vb) >= LARGE_VALUE:
            hints.large_value_warning(b.name, len(vb))
        if b.indexes or b.expiring:
            self._put_indexed(b, kb, vb, value)
        else:
            self._txn.put(kb, vb, db=b.db)
        if self._log is not None:
            self._log.append((b.tid, kb, vb))

    # incr and cas write through this name, which a subclass that records put() (the store's
    # replaying transaction) leaves alone, so their writes are not recorded twice.
    _put = put

    def put_raw(self, table: BoundRef, key_bytes: bytes, value_bytes: bytes) -> None:
        """Store already encoded bytes (the shard owner's path); indexes are still kept."""
        b = self._tables[table]
        if len(value_bytes) >= LARGE_VALUE:
            hints.large_value_warning(b.name, len(value_bytes))
        if b.indexes:
            self._put_indexed(b, key_bytes, value_bytes, b.loads(value_bytes))
        elif b.expiring:
            self._put_indexed(b, key_bytes, value_bytes, None)
        else:
            self._txn.put(key_bytes, value_bytes, db=b.db)
        if self._log is not None:
            self._log.append((b.tid, key_bytes, value_bytes))

    # incr and persist store through this name, left alone by a subclass that records
    # put_raw(), for the reason given at _put.
    _put_raw = put_raw

    def _put_indexed(self, b: BoundTable, kb: bytes, vb: bytes, value: Any) -> None:
        """A put that keeps indexes and the expiry index in step (``value``: the decoded row
        value, needed only with indexes)."""
        txn = self._txn
        if not b.indexes:  # a table with ttl and no indexes
            old = txn.replace(kb, vb, db=b.db)
            _move_expiry(txn, b, kb, old, vb)
            return
        new = [(bi, bi.encode(value)) for bi in b.indexes]
        for holder in _check_new_entries(txn, b, kb, value, new):
            self._delete(b, holder)  # an expired row gives up its unique value
        old = txn.replace(kb, vb, db=b.db)
        if b.expiring:
            _move_expiry(txn, b, kb, old, vb)
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

    def delete(self, table: BoundRef, key: Any) -> bool:
        """Remove the row under ``key`` and its index entries; False if there was none."""
        b = self._tables[table]
        return self._delete(b, b.kenc(key))

    def delete_raw(self, table: BoundRef, key_bytes: bytes) -> bool:
        """Remove the row under an already encoded key (the shard owner's path)."""
        return self._delete(self._tables[table], key_bytes)

    def _delete(self, b: BoundTable, key_bytes: bytes) -> bool:
        """Remove a row; whether a row (one not yet expired) was there."""
        if not b.indexes and not b.expiring:
            gone = bool(self._txn.delete(key_bytes, db=b.db))
        else:
            old = self._txn.pop(key_bytes, db=b.db)
            if old is None:
                return False
            if b.indexes:
                old_value = b.loads(old)
                for bi in b.indexes:
                    oivb = _old_entry(bi, old_value)
                    if oivb is not None:
                        _drop_entry(self._txn, bi, oivb, key_bytes)
            gone = True
            if b.expiring:
                _move_expiry(self._txn, b, key_bytes, old, None)
                gone = live_row(old) is not None
        if self._log is not None and (gone or b.expiring):
            self._log.append((b.tid, key_bytes, None))
        return gone

    def incr(self, table: BoundRef, key: Any, delta: int = 1) -> int:
        """Add ``delta`` to the integer stored under ``key`` (missing counts as 0)."""
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise TransactionError(
                f"incr delta must be an int, not {type(delta).__name__}", hint="pass an int"
            )
        b = self._tables[table]
        data = None
        if b.expiring:
            kb = b.kenc(key)
            data = self.get_raw(b, kb)
            current = 0 if data is None else b.loads(data)
        else:
            current = self.get(table, key, 0)
        if not isinstance(current, int) or isinstance(current, bool):
            raise ConflictError(
                f"incr on {b.name} found a {type(current).__name__}, not an int",
                hint="incr works on rows that hold an int",
            )
        new = current + delta
        if not b.expiring:
            self._put(table, key, new)
            return new
        # a live row keeps its expiry; a new row (or one that expired) gets the default ttl
        vb = b.dumps(new) if data is None else stamped(expiry_of(data), b.table.value.dumps(new))
        self._put_raw(b, kb, vb)
        return new

    def persist(self, table: BoundRef, key: Any) -> bool:
        """Make the row under ``key`` never expire; whether it had an expiry to remove
        (False for no row). TTLError for a table declared without ttl."""
        b = self._tables[table]
        b.check_expiring("persist")
        return self.persist_raw(b, b.kenc(key))

    def persist_raw(self, table: BoundRef, key_bytes: bytes) -> bool:
        """``persist`` on an already encoded key (the shard owner's path)."""
        b = self._tables[table]
        data = self.get_raw(b, key_bytes)
        if data is None or expiry_of(data) == 0:
            return False
        vb = NO_EXPIRY + bytes(data[EXPIRY_SIZE:])
        self._put_raw(b, key_bytes, vb)
        return True

    def expire(self, limit: int = EXPIRE_STEP, now: int | None = None) -> int:
        """Delete up to ``limit`` rows whose expiry (ms since the epoch) is at or before
        ``now`` (default: the wall clock), with their index entries, oldest expiry first, as
        ordinary deletes (the change log records them); the number deleted."""
        now = now_ms() if now is None else now
        txn = self._txn
        deleted = 0
        for b in self._tables.expiring:
            due: list[bytes] = []
            for k in txn.cursor(db=b.expiry_db).iternext(values=False):
                if len(due) + deleted >= limit or int.from_bytes(k[:EXPIRY_SIZE], "big") > now:
                    break
                due.append(bytes(k))
            for entry in due:
                kb = entry[EXPIRY_SIZE:]
                data = txn.get(kb, db=b.db)
                if data is not None and data[:EXPIRY_SIZE] == entry[:EXPIRY_SIZE]:
                    self._delete(b, kb)
                    deleted += 1
                else:  # an entry its row no longer matches: never written so, but harmless
                    txn.delete(entry, db=b.expiry_db)
            if deleted >= limit:
                break
        return deleted

    def cas(
        self,
        table: BoundRef,
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
        data = self.get_raw(b, b.kenc(key))
        if expected_hash is not None:
            ok = data is not None and value_hash(b.payload(data)) == expected_hash
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

    def incr_raw(self, table: BoundRef, key_bytes: bytes, delta: int) -> int:
        """``incr`` on an already encoded key (the shard owner's path)."""
        b = self._tables[table]
        return self.incr(table, b.kdec(key_bytes), delta)

    def cas_raw(
        self, table: BoundRef, key_bytes: bytes, value_bytes: bytes,
        expected_bytes: bytes | None, expected_hash: bytes | None,
    ) -> bool:
        """``cas`` with encoded key, value and expectation (the shard owner's path)."""
        b = self._tables[table]
        data = self.get_raw(b, key_bytes)
        if expected_hash is not None:
            ok = data is not None and value_hash(b.payload(data)) == expected_hash
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

    def purge(self, table: BoundRef) -> int:
        """Drop every row and index entry of a table; returns the number of rows dropped."""
        b = self._tables[table]
        n = int(self._txn.stat(b.db)["entries"])
        if self._log is not None:
            tid = b.tid
            self._log.extend((tid, bytes(k), None)
                             for k in self._txn.cursor(db=b.db).iternext(values=False))
        self._txn.drop(b.db, delete=False)
        for bi in b.indexes:
            self._txn.drop(bi.db, delete=False)
        if b.expiring:
            self._txn.drop(b.expiry_db, delete=False)
        return n


def _move_expiry(txn: Any, b: BoundTable, kb: bytes, old: Any, new: bytes | None) -> None:
    """Keep the expiry index in step when a row of a table with ttl goes from stored bytes
    ``old`` to ``new`` (None: no row)."""
    was = 0 if old is None else expiry_of(old)
    now = 0 if new is None else expiry_of(new)
    if was != now:
        if was:
            txn.delete(expiry_entry(was, kb), db=b.expiry_db)
        if now:
            txn.put(expiry_entry(now, kb), b"", db=b.expiry_db)


def _check_new_entries(
    txn: Any, b: BoundTable, kb: bytes, value: Any, new: list[tuple[BoundIndex, bytes | None]]
) -> list[bytes]:
    """Refuse a row whose index entries break an index's shard key or uniqueness; the keys of
    expired rows that hold one of its unique values (to delete before it is written)."""
    for bi, _ in new:
        if bi.index.shard_key is not None:
            _check_index_shard_key(b, bi, kb, value)
    expired = []
    for bi, ivb in new:
        if bi.unique and ivb is not None:
            holder = txn.get(ivb, db=bi.db)
            if holder is not None and holder != kb:
                if b.expiring and live_row(txn.get(holder, db=b.db)) is None:
                    expired.append(bytes(holder))
                    continue
                raise UniqueViolation(
                    f"{b.name}.{bi.name}: the value {_json_safe(bi.fn(value))!r} is already "
                    f"used by the row with key {b.table.key.to_json(b.kdec(holder))!r}"
                )
    return expired


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
