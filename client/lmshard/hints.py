"""Advice logged when code uses the store in a way that will not scale.

Two symptoms are watched, each logged on the ``lmshard.hints`` logger at WARNING, once per
process for each place it comes from (so a hot loop does not flood the log):

* a ``scan(..., where=...)`` over a large table that kept only a few rows, all sharing one value
  of an index the table already has: the same rows come from ``store.lookup()`` in a few reads
  (:func:`index_hint`, :func:`log_index_hint`, :func:`watch_where_scan`);
* a value of a megabyte or more written into a row (:func:`large_value_warning`): every read of
  the row copies it and every rewrite copies its pages.

The functions here look at the values the scan or write already has in hand. To confirm a hint
they count the suggested lookup's entries in the index (bounded, no row is read), and only on
tables of ``INDEX_HINT_MIN_ROWS`` rows or more, so small tables pay nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lmshard.index_values import encode_index_prefix, encode_index_value

log = logging.getLogger("lmshard.hints")

INDEX_HINT_MIN_ROWS = 1_000
"""Rows a table (and the scan) must have before a where= scan is worth a hint."""
INDEX_HINT_MAX_FRACTION = 0.1
"""A hint needs the where= filter to keep at most this share of the rows it read."""
LARGE_VALUE_WARNING = 1 << 20
"""Value size in bytes (1 MiB) from which a write logs the large-blob advice."""

_said: set[tuple[str, ...]] = set()
_said_lock = threading.Lock()


def _first_time(*what: str) -> bool:
    with _said_lock:
        if what in _said:
            return False
        _said.add(what)
        return True


def reset_hints() -> None:
    """Forget which hints were already logged (for tests, or after reconfiguring logging)."""
    with _said_lock:
        _said.clear()


def _common_value(fn: Callable[[Any], Any], values: list[Any]) -> tuple[Any, bool] | None:
    """The index value every row shares as a tuple (a scalar as a 1-tuple, which encodes the
    same), or the longest shared leading part of a composite value (then ``prefix`` is True);
    None when the rows share nothing an index lookup could use.
    """
    try:
        first = fn(values[0])
        if first is None:  # a nullable index leaves these rows out
            return None
        if not isinstance(first, tuple | list):
            if any(fn(v) != first for v in values[1:]):
                return None
            return (first,), False
        common = len(first)
        for v in values[1:]:
            other = fn(v)
            if not isinstance(other, tuple | list):
                return None
            n = 0
            while n < common and n < len(other) and other[n] == first[n]:
                n += 1
            common = n
            if common == 0:
                return None
    except Exception:  # an index function that cannot read some row: not a candidate
        return None
    return tuple(first[:common]), common < len(first)


def _lookup_count(txn: Any, table: Any, index: Any, value: Any, prefix: bool, stop: int) -> int:
    """Index entries (rows) the lookup would return, counting no further than ``stop``."""
    bi = txn.tables[table].index(index.name)
    lmdb_txn = txn.txn
    if not prefix:
        ivb = encode_index_value(value)
        if bi.unique:
            return int(lmdb_txn.get(ivb, db=bi.db) is not None)
        cur = lmdb_txn.cursor(db=bi.db)
        return int(cur.count()) if cur.set_key(ivb) else 0
    lo = encode_index_prefix(value)
    cur = lmdb_txn.cursor(db=bi.db)
    n = 0
    if cur.set_range(lo):
        for k in cur.iternext(keys=True, values=False):
            if not k.startswith(lo) or n >= stop:
                break
            n += 1
    return n


def _suggestion(
    table: Any, matched_values: list[Any], txn: Any
) -> tuple[str, str] | None:
    """(index name, lookup call) of the best index for the matched rows, or None."""
    found = []
    for order, ix in enumerate(table.indexes.values()):
        common = _common_value(ix.fn, matched_values)
        if common is None:
            continue
        value, prefix = common
        # Best first: a whole-value lookup before a prefix one; a unique index (possible only
        # when one row matched); the index sharing the most elements (the narrowest lookup);
        # then declaration order.
        found.append(((int(prefix), int(not ix.unique), -len(value), order), ix, value, prefix))
    found.sort(key=lambda c: c[0])
    for _, ix, value, prefix in found:
        if txn is not None:
            # Suggest only a lookup giving exactly the matched rows: every one of them has this
            # index value, so an equal count means the same rows, not a superset.
            want = len(matched_values)
            if _lookup_count(txn, table, ix, value, prefix, want + 1) != want:
                continue
        # A one-element prefix stays a tuple: a bare str would be a string-prefix lookup.
        shown = value[0] if len(value) == 1 and not prefix else value
        call = f"store.lookup({table.name!r}, {ix.name!r}, {shown!r}"
        return ix.name, call + (", prefix=True)" if prefix else ")")
    return None


def _applies(scanned: int, matched: int, table_rows: int) -> bool:
    return (
        matched > 0
        and table_rows >= INDEX_HINT_MIN_ROWS
        and scanned >= INDEX_HINT_MIN_ROWS
        and matched <= scanned * INDEX_HINT_MAX_FRACTION
    )


def _message(table: Any, scanned: int, matched: int, call: str) -> str:
    rows = "row" if matched == 1 else "rows"
    return (
        f"scan of {table.name} with where= read {scanned:,} rows to find {matched:,} {rows}; "
        f"use {call}"
    )


def index_hint(
    table: Any, scanned: int, matched_values: list[Any], table_rows: int, *, txn: Any = None
) -> str | None:
    """Advice for a finished ``scan(where=...)``: the index lookup that finds the same rows.

    ``table`` is the scanned :class:`lmshard.Table` (anything with ``name`` and ``indexes``),
    ``scanned`` the rows the scan decoded, ``matched_values`` the values ``where`` kept and
    ``table_rows`` the table's size. Returns None unless the table and the scan are large
    (``INDEX_HINT_MIN_ROWS``), at least one row matched, the matches are a small share of the
    rows read (``INDEX_HINT_MAX_FRACTION``), and one index of the table gives every matched row
    the same value (or, for a composite index, the same leading elements).

    With ``txn`` (the scan's read transaction) a lookup is suggested only when the index holds
    exactly as many entries for that value as rows matched, so it returns the same rows.
    """
    table = getattr(table, "table", table)  # a BoundTable carries its Table
    if not _applies(scanned, len(matched_values), table_rows) or not table.indexes:
        return None
    best = _suggestion(table, matched_values, txn)
    return None if best is None else _message(table, scanned, len(matched_values), best[1])


def log_index_hint(
    table: Any, scanned: int, matched_values: list[Any], table_rows: int, *, txn: Any = None
) -> str | None:
    """Log :func:`index_hint`'s advice at WARNING, once per (table, index) in this process.

    Returns the hint when one applies (logged now or before), else None.
    """
    table = getattr(table, "table", table)
    if not _applies(scanned, len(matched_values), table_rows) or not table.indexes:
        return None
    best = _suggestion(table, matched_values, txn)
    if best is None:
        return None
    hint = _message(table, scanned, len(matched_values), best[1])
    if _first_time("index", table.name, best[0]):
        log.warning("%s (logged once per table and index)", hint)
    return hint


def watch_where_scan(
    items: Iterator[tuple[Any, Any]],
    table: Any,
    where: Callable[[Any], bool],
    limit: int | None,
    table_rows: int,
    txn: Any = None,
) -> Iterator[tuple[Any, Any]]:
    """Filter decoded ``(key, value)`` pairs with ``where`` (up to ``limit``) and, when the scan
    is done, log an index hint if one applies.

    The scan path hands its rows here instead of filtering them itself when the table has at
    least ``INDEX_HINT_MIN_ROWS`` rows. Matched values are kept only while they could still be a
    small share of the table. A scan abandoned before its end logs nothing.
    """
    if limit is not None and limit <= 0:
        return
    keep = int(table_rows * INDEX_HINT_MAX_FRACTION)
    matched: list[Any] = []
    scanned = n = 0
    for key, value in items:
        scanned += 1
        if not where(value):
            continue
        n += 1
        if n <= keep:
            matched.append(value)
        yield key, value
        if limit is not None and n >= limit:
            break
    if n <= keep:  # with more matches than that no hint can apply
        log_index_hint(table, scanned, matched, table_rows, txn=txn)


def large_value_warning(table_name: str, size: int) -> None:
    """Log, once per table, advice about a ``size``-byte value just written (only from
    ``LARGE_VALUE_WARNING`` bytes up; smaller sizes are ignored)."""
    if size < LARGE_VALUE_WARNING or not _first_time("large", table_name):
        return
    log.warning(
        "table %s: a %s-byte value was written (warning from %s bytes, logged once per table): "
        "every read copies a value this large and every rewrite copies all its pages; store big "
        "blobs elsewhere (files, object storage) or split them into chunk rows, and keep a "
        "reference (path, hash, chunk count) in the row",
        table_name, f"{size:,}", f"{LARGE_VALUE_WARNING:,}",
    )
