"""Time series on the table layer: NumPy columns in chunk rows, one table for many series.

``TimeSeries(schema, "prices", table_id=...)`` declares a table keyed by
``(series id, chunk start timestamp)``. Each row holds one chunk of up to ``chunk_rows`` points as
a single value of the ``numpy`` codec: a record with two columns, ``t`` (int64 nanoseconds since
the epoch, strictly increasing) and ``v`` (the declared dtype), so a chunk decodes to two
contiguous arrays without a copy. Reading a time range touches only the chunks that overlap it.

Each series also has a head row (under the reserved timestamp ``HEAD_TS``) holding its last
timestamp, where its tail chunk starts, and its point count. An append whose points all fit in
the tail chunk's room goes into it (the tail is written again); a larger one starts new chunks
and leaves the tail as it is, so a large append writes its own points once, not the tail's
again too (each chunk written is also a change-log record and fsync'd bytes), while a stream
of small appends still fills its chunks. Every append changes the head with a compare-and-set
in the same batch, so two writers appending to one series at once cannot interleave their
points: one of them retries, and its points must then still come after the other's.

Writes go through ``store.batch()``, reads through ``store.read()`` where the store has read
transactions (the embedded store) and through its ``get``/``scan`` otherwise (the daemon client).
Reads need no snapshot for correctness: a series only grows at its end, and an append whose view
of the head went stale fails its compare-and-set and is retried. A series' rows share a shard
(``shard_key`` is the series id), so each append is one atomic batch on a sharded store too.

NumPy is imported by the functions that use it, not when this module is imported: importing it
costs more than the rest of ``import lmshard``, and only processes that use time series need it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lmshard.errors import ConflictError, Error, SchemaError
from lmshard.schema import Schema, Table
from lmshard.txn import value_hash

if TYPE_CHECKING:
    import numpy as np

HEAD_TS = -(2**63)
"""The timestamp key of each series' head row; points cannot use it."""
DEFAULT_CHUNK_ROWS = 1024
"""Points per chunk row: 16 KiB for float64 values, a few LMDB pages."""
APPEND_ATTEMPTS = 3
"""Times append() retries after another writer appended to the same series in between."""

Points = tuple["np.ndarray", "np.ndarray"]
AGGREGATES = ("mean", "sum", "min", "max", "first", "last", "count")


class OutOfOrder(Error, ValueError):
    """Timestamps given to append() are not strictly increasing, or not after the series' last
    stored point; nothing was written."""

    hint = "append points in time order; a series only grows at its end"


@contextmanager
def _reading(store: Any) -> Iterator[Any]:
    """A read transaction where the store has them, else the store itself (get, scan)."""
    read = getattr(store, "read", None)
    if read is None:
        yield store
    else:
        with read() as r:
            yield r


def _ns(t: Any) -> int:
    """An instant as int nanoseconds since the epoch (naive datetimes are UTC)."""
    import numpy as np

    if isinstance(t, bool):
        raise TypeError("a timestamp cannot be a bool")
    if isinstance(t, int | np.integer):
        return int(t)
    if isinstance(t, np.datetime64):
        return int(t.astype("datetime64[ns]").astype(np.int64))
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.UTC)
        delta: _dt.timedelta = t - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
        return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    raise TypeError(
        f"a timestamp must be int nanoseconds, a datetime or a numpy.datetime64, "
        f"not {type(t).__name__}"
    )


def _ns_array(timestamps: Any) -> np.ndarray:
    import numpy as np

    arr = np.asarray(timestamps)
    if arr.dtype.kind == "M":
        arr = arr.astype("datetime64[ns]").view(np.int64)
    elif arr.dtype.kind in "iu" or arr.size == 0:
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError("timestamps past the int64 range of nanoseconds")
        arr = arr.astype(np.int64, copy=False)
    else:
        raise TypeError(
            f"timestamps must be ints (nanoseconds since the epoch) or datetime64, "
            f"not an array of {arr.dtype}"
        )
    if arr.ndim != 1:
        raise ValueError(f"timestamps must be one-dimensional, not of shape {arr.shape}")
    return arr


class TimeSeries:
    """A table of time series: ``append`` points, read a ``range``, ``downsample`` it."""

    def __init__(
        self,
        schema: Schema,
        name: str,
        *,
        table_id: str,
        series_key: str = "str",
        dtype: Any = "float64",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        doc: str | None = None,
    ) -> None:
        import numpy as np

        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise SchemaError(
                f"time series {name!r}: dtype {self.dtype} holds Python objects",
                hint="use a numeric, bool or structured dtype without object fields",
            )
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise SchemaError(f"time series {name!r}: chunk_rows must be an int >= 1")
        self.chunk_rows = chunk_rows
        self.table: Table = schema.table(
            name,
            table_id=table_id,
            key=(series_key, "timestamp"),
            value="numpy",
            shard_key=1,  # a series on one shard: its appends atomic, its range reads local
            doc=doc
            or f"time series: (series {series_key}, chunk start ns) -> chunk record with "
            f"columns t (int64 ns) and v ({self.dtype}); head row at timestamp {HEAD_TS}",
        )
        self._chunk_dtypes: dict[int, np.dtype] = {}

    def __repr__(self) -> str:
        return f"<TimeSeries {self.table.name} dtype={self.dtype} chunk_rows={self.chunk_rows}>"

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, ts: np.ndarray, vs: np.ndarray) -> np.ndarray:
        import numpy as np

        n = len(ts)
        dtype = self._chunk_dtypes.get(n)
        if dtype is None:
            dtype = self._chunk_dtypes[n] = np.dtype(
                [("t", np.int64, (n,)), ("v", self.dtype, (n,))]
            )
        chunk = np.empty((), dtype)
        chunk["t"] = ts
        chunk["v"] = vs
        return chunk

    @staticmethod
    def _head(last: int, tail_start: int, points: int) -> np.ndarray:
        import numpy as np

        return np.array([last, tail_start, points], dtype=np.int64)

    # -- reading ----------------------------------------------------------------------------

    def info(self, store: Any, series: Any) -> dict[str, int] | None:
        """The series' head: its ``last`` timestamp, ``points`` count and ``tail_start`` (the key
        timestamp of its last chunk); None for a series without points."""
        with _reading(store) as r:
            head = r.get(self.table, (series, HEAD_TS))
        if head is None:
            return None
        return {"last": int(head[0]), "tail_start": int(head[1]), "points": int(head[2])}

    def range(self, store: Any, series: Any, start: Any = None, end: Any = None) -> Points:
        """Timestamps and values with ``start <= t < end`` (None: unbounded), each as one array.

        Only the chunks overlapping the range are read, all from one snapshot.
        """
        import numpy as np

        lo = None if start is None else _ns(start)
        hi = None if end is None else _ns(end)
        t = self.table
        chunks = []
        if hi is None or lo is None or lo < hi:
            with _reading(store) as r:
                first = (series, HEAD_TS + 1)
                if lo is not None and lo > HEAD_TS:
                    first = (series, lo)
                    # The chunk holding `lo` starts at or before it: the last key <= lo.
                    before = (series, lo + 1) if lo < 2**63 - 1 else None
                    for key, _ in r.scan(t, prefix=(series,), end=before, reverse=True, limit=1):
                        if key[1] != HEAD_TS:
                            first = key
                stop = None if hi is None else (series, hi)
                chunks = [c for _, c in r.scan(t, prefix=(series,), start=first, end=stop)]
        if not chunks:
            return np.empty(0, np.int64), np.empty(0, self.dtype)
        ts = np.concatenate([c["t"] for c in chunks])
        vs = np.concatenate([c["v"] for c in chunks])
        i = 0 if lo is None else int(np.searchsorted(ts, lo, "left"))
        j = len(ts) if hi is None else int(np.searchsorted(ts, hi, "left"))
        return ts[i:j], vs[i:j]

    def downsample(
        self,
        store: Any,
        series: Any,
        start: Any,
        end: Any,
        every_ns: int,
        how: str = "mean",
        *,
        origin: int = 0,
    ) -> Points:
        """One point per ``every_ns``-long bucket of ``[start, end)`` that holds points.

        Buckets are aligned to ``origin`` (default the epoch, so a minute bucket starts at a
        whole minute); each result timestamp is its bucket's start. ``how`` is one of
        ``AGGREGATES``; "mean" gives float64, "count" int64, the others the series' dtype.
        Empty buckets are left out rather than filled.
        """
        import numpy as np

        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {', '.join(AGGREGATES)}, not {how!r}")
        if not isinstance(every_ns, int | np.integer) or every_ns <= 0:
            raise ValueError(f"every_ns must be a positive int, not {every_ns!r}")
        ts, vs = self.range(store, series, start, end)
        if len(ts) == 0:
            empty = np.int64 if how == "count" else np.float64 if how == "mean" else self.dtype
            return np.empty(0, np.int64), np.empty(0, empty)
        bucket = (ts - np.int64(origin)) // np.int64(every_ns)
        firsts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
        ends = np.append(firsts[1:], len(ts))
        out_ts = bucket[firsts] * np.int64(every_ns) + np.int64(origin)
        if how in ("first", "last", "count"):
            if how == "first":
                return out_ts, vs[firsts]
            if how == "last":
                return out_ts, vs[ends - 1]
            return out_ts, (ends - firsts).astype(np.int64)
        if self.dtype.fields is not None:
            raise TypeError(f"{how} needs numeric values, not records of {self.dtype}")
        if how == "mean":
            sums = np.add.reduceat(vs.astype(np.float64), firsts)
            return out_ts, sums / (ends - firsts)
        ufunc = {"sum": np.add, "min": np.minimum, "max": np.maximum}[how]
        return out_ts, ufunc.reduceat(vs, firsts)

    # -- writing ----------------------------------------------------------------------------

    def append(self, store: Any, series: Any, timestamps: Any, values: Any) -> int:
        """Add points at the end of a series in one batch; returns how many were added.

        ``timestamps`` are int nanoseconds (or datetime64) and must be strictly increasing and
        after the series' last stored point, else OutOfOrder and nothing is written. Values are
        cast to the declared dtype when NumPy's "same_kind" casting allows it.
        """
        import numpy as np

        ts = _ns_array(timestamps)
        vs = np.asarray(values)
        if vs.shape != ts.shape:
            raise ValueError(
                f"{len(ts)} timestamps but values of shape {vs.shape}: give one value per "
                "timestamp"
            )
        if vs.dtype != self.dtype:
            if not np.can_cast(vs.dtype, self.dtype, "same_kind"):
                raise TypeError(
                    f"values of dtype {vs.dtype} do not fit the series dtype {self.dtype}"
                )
            vs = vs.astype(self.dtype)
        n = len(ts)
        if n == 0:
            return 0
        steps = np.diff(ts)
        if (steps <= 0).any():
            i = int(np.flatnonzero(steps <= 0)[0])
            raise OutOfOrder(
                f"{self.table.name}[{series!r}]: timestamps[{i + 1}] = {ts[i + 1]} is not after "
                f"timestamps[{i}] = {ts[i]}; nothing was written"
            )
        if ts[0] == HEAD_TS:
            raise OutOfOrder(f"timestamp {HEAD_TS} is reserved for the series head")
        for attempt in range(APPEND_ATTEMPTS):
            try:
                self._append_once(store, series, ts, vs)
                return n
            except ConflictError:
                if attempt == APPEND_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _append_once(self, store: Any, series: Any, ts: np.ndarray, vs: np.ndarray) -> None:
        import numpy as np

        t, n, size = self.table, len(ts), self.chunk_rows
        head_key = (series, HEAD_TS)
        with _reading(store) as r:
            head = r.get(t, head_key)
            # A tail holds a point at least: n >= size points never fit in its room.
            tail = None if head is None or n >= size else r.get(t, (series, int(head[1])))
        if head is not None and ts[0] <= head[0]:
            raise OutOfOrder(
                f"{t.name}[{series!r}]: the first timestamp {ts[0]} is not after the last "
                f"stored one, {int(head[0])}; nothing was written"
            )
        rows: list[tuple[int, np.ndarray]] = []
        pos = 0
        if tail is not None and len(tail["t"]) + n <= size:  # all of it fits: into the tail
            pos = n
            merged = self._chunk(np.concatenate((tail["t"], ts)), np.concatenate((tail["v"], vs)))
            rows.append((int(head[1]), merged))
        for s in range(pos, n, size):
            rows.append((int(ts[s]), self._chunk(ts[s : s + size], vs[s : s + size])))
        points = n + (0 if head is None else int(head[2]))
        new_head = self._head(int(ts[-1]), rows[-1][0], points)
        with store.batch() as b:
            if head is None:
                b.cas(t, head_key, new_head, None)
            else:
                # Any other append changed the head: then this batch fails and is retried.
                b.cas(t, head_key, new_head, expected_hash=value_hash(t.value.dumps(head)))
            for start, chunk in rows:
                b.put(t, (series, start), chunk)

    def drop(self, store: Any, series: Any) -> int:
        """Delete every point of a series (its chunk rows and head) in one batch; returns the
        number of points it had."""
        t = self.table
        with _reading(store) as r:
            keys = [k for k, _ in r.scan(t, prefix=(series,))]
            head = r.get(t, (series, HEAD_TS))
        with store.batch() as b:
            for k in keys:
                b.delete(t, k)
        return 0 if head is None else int(head[2])
