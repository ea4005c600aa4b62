"""Key ranges over LMDB cursors: the bounds of a scan, and iterating them in either direction.

A range is ``lo <= key < hi`` over encoded keys (None: unbounded). A prefix narrows it to
[prefix, prefix_end(prefix)). Used by transactions, by the client to merge shards' scans, and by
the owner to page through a scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


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


def range_items(
    cur: Any, lo: bytes | None, hi: bytes | None, reverse: bool
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of cursor ``cur``'s database with ``lo <= key < hi``, in key order
    (descending with ``reverse``)."""
    items: Iterator[tuple[bytes, bytes]]
    if not reverse:
        if lo is None:
            positioned = cur.first()
        else:
            positioned = cur.set_range(lo)
        if not positioned:
            return iter(())
        if hi is None:
            items = cur.iternext()
            return items
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
        items = cur.iterprev()
        return items
    return _down_to(cur.iterprev(), lo)


def range_keys(cur: Any, lo: bytes | None, hi: bytes | None) -> Iterator[bytes]:
    """The keys of cursor ``cur``'s database with ``lo <= key < hi``, ascending."""
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
    """Decoded (key, value) rows of ``items`` whose value passes ``where``, at most ``limit``."""
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
