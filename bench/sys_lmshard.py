"""lmshard through its daemon: workers are client processes, writes go to the shard owners.

Each worker connects with ``lmshard.connect(config)`` as a service would: writes are routed to
the owning shard's owner process and acked after its (group) commit with fsync; reads open the
shards read-only in the worker (local reads), or go through the reader pool (remote gets).
"""

from __future__ import annotations

from typing import Any

from bench import timing
from bench.procs import Run
from bench.schema import (
    TS_STEP_NS,
    email,
    random_keys,
    record,
    series_name,
    ticks,
    ts_points,
    ts_queries,
)


def _client(spec: dict[str, Any], **options: Any) -> Any:
    import lmshard

    c = lmshard.connect(spec["config"], **options)
    for s in range(c.shards):
        c.ping(s)
    return c


def _warm(c: Any, n: int) -> None:
    """Open every shard's environment (local reads) before the clock starts."""
    for k in range(min(n, 64)):
        c.get("records", k)


def insert_batched(spec: dict[str, Any]) -> Run:
    """Bulk load through ``client.writer()``: batches of ``batch`` ops per shard, up to 4 in
    flight per shard (as Redis pipelines its SETs). A chunk's latency is the time its rows took
    to hand over (waiting when a shard's window is full); the final flush, which waits for the
    last acks, is added to the last chunk, so the wall-clock span covers every commit."""
    import time

    c = _client(spec)
    batch, start, count = spec["batch"], spec["start"], spec["count"]
    rows = [record(i) for i in range(start, start + count)]
    chunks = [rows[s:s + batch] for s in range(0, count, batch)]
    w = c.writer(batch_size=batch, window=4)

    def op(chunk: list[dict[str, Any]]) -> None:
        put = w.put
        for r in chunk:
            put("records", r["id"], r)

    def run() -> tuple[int, list[int]]:
        _, lat = timing.each(op, chunks)
        t = time.perf_counter_ns()
        w.flush()
        lat[-1] += time.perf_counter_ns() - t
        return count, lat

    return run


def commit_batches(spec: dict[str, Any]) -> Run:
    """One acked commit per batch: each batch of ``batch`` rows goes through ``client.batch()``,
    which returns once the owner has committed it (fsync included, unless the service flushes
    by interval). A batch's latency runs from the start of its ``with`` block (the rows are
    encoded inside the clock, as raw py-lmdb's are) to that ack."""
    c = _client(spec)
    batch, start, count = spec["batch"], spec["start"], spec["count"]
    rows = [record(i) for i in range(start, start + count)]
    chunks = [rows[s:s + batch] for s in range(0, count, batch)]

    def op(chunk: list[dict[str, Any]]) -> None:
        with c.batch() as b:
            put = b.put
            for r in chunk:
                put("records", r["id"], r)

    return lambda: (count, timing.each(op, chunks)[1])


def put_acked(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    rows = [record(i) for i in range(spec["start"], spec["start"] + spec["count"])]
    put = c.put

    def op(r: dict[str, Any]) -> None:
        put("records", r["id"], r)

    return lambda: timing.each(op, rows)


def get_points(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    _warm(c, spec["n"])
    get = c.get
    keys = random_keys(spec["seed"], spec["count"], spec["n"])

    def op(k: int) -> None:
        get("records", k)

    return lambda: timing.sampled(op, keys)


def get_many(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    _warm(c, spec["n"])
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    calls = [keys[s:s + spec["batch"]] for s in range(0, len(keys), spec["batch"])]
    get_many = c.get_many

    def op(ks: list[int]) -> list[Any]:
        return get_many("records", ks)

    return lambda: (len(keys), timing.each(op, calls)[1])


def scan_full(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    _warm(c, spec["n"])

    def run() -> tuple[int, list[int]]:
        n, lat = timing.pages(c.scan("records"))
        if n != spec["n"]:
            raise AssertionError(f"scanned {n} rows, expected {spec['n']}")
        return n, lat

    return run


def remote_get(spec: dict[str, Any]) -> Run:
    """Point gets through the reader pool (``via = "pool"``) or the owners (``"owner"``)."""
    c = _client(spec, local_reads=False)
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    if spec["via"] == "owner":
        get = c.get

        def op(k: int) -> None:
            get("records", k)

        for k in keys[:64]:
            op(k)
        return lambda: timing.each(op, keys)

    from lmshard.protocol import COMMANDS
    from lmshard.remote import ReaderPool

    pool = ReaderPool(c.config)
    table = c.schema.tables["records"]
    tid, kenc, loads = table.table_id.bytes, table.key.encode, table.value.loads
    shard_of, request = c.config.slot_map.shard_of, pool.request
    get_code = COMMANDS["get"].code

    def pool_get(k: int) -> None:
        kb = kenc(k)
        data = request(shard_of(kb), get_code, [tid, kb])
        if data is not None:
            loads(data)

    for k in keys[:64]:
        pool_get(k)
    return lambda: timing.each(pool_get, keys)


def fill_events(spec: dict[str, Any]) -> Run:
    c = _client(spec)

    def run() -> tuple[int, list[int]]:
        for s in range(spec["series"]):
            series = series_name(s)
            with c.batch() as b:
                for seq in range(spec["per_series"]):
                    b.put("events", (series, seq), record(seq))
        return spec["series"] * spec["per_series"], []

    return run


def scan_prefix(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    _warm(c, 64)
    picks = [series_name(s) for s in random_keys(spec["seed"], spec["count"], spec["series"])]
    scan = c.scan
    rows = 0

    def op(series: str) -> None:
        nonlocal rows
        rows += len(list(scan("events", prefix=(series,))))

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, picks)[1]
        return rows, lat

    return run


def fill_users(spec: dict[str, Any]) -> Run:
    c = _client(spec)

    def run() -> tuple[int, list[int]]:
        for s in range(0, spec["count"], 1000):
            with c.batch() as b:
                for i in range(s, min(s + 1000, spec["count"])):
                    b.put("users", i, record(i))
        return spec["count"], []

    return run


def lookup_unique(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    lookup = c.lookup
    emails = [email(i) for i in random_keys(spec["seed"], spec["count"], spec["users"])]
    lookup("users", "by_email", emails[0])

    def op(e: str) -> None:
        lookup("users", "by_email", e)

    return lambda: timing.sampled(op, emails)


def mixed(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    _warm(c, spec["n"])
    get, put = c.get, c.put
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    every = spec["write_every"]
    items = [(i % every == every - 1, k, record(k) if i % every == every - 1 else None)
             for i, k in enumerate(keys)]

    def op(item: tuple[bool, int, Any]) -> None:
        write, k, r = item
        if write:
            put("records", k, r)
        else:
            get("records", k)

    return lambda: timing.each(op, items)


# -- time series: lmshard.timeseries.TimeSeries, or NumPy bytes in a uint64 table -------------


def _fallback_key(series: int, start_ns: int) -> int:
    return (series << 40) | ((start_ns // TS_STEP_NS) & ((1 << 40) - 1))


def ts_append(spec: dict[str, Any]) -> Run:
    c = _client(spec)
    size = spec["per_append"]
    calls = [(s, cn) for cn in range(spec["appends"]) for s in spec["series_ids"]]

    if hasattr(ticks, "append"):
        def op(call: tuple[int, int]) -> None:
            ts, vs = ts_points(call[1], size)
            ticks.append(c, series_name(call[0]), ts, vs)
    else:
        def op(call: tuple[int, int]) -> None:
            ts, vs = ts_points(call[1], size)
            c.put("ticks", _fallback_key(call[0], int(ts[0])), ts.tobytes() + vs.tobytes())

    return lambda: (len(calls) * size, timing.each(op, calls)[1])


def ts_range(spec: dict[str, Any]) -> Run:
    import numpy as np

    c = _client(spec)
    queries = ts_queries(spec)
    points = 0

    if hasattr(ticks, "range"):
        def op(q: tuple[str, int, int]) -> None:
            nonlocal points
            points += len(ticks.range(c, q[0], q[1], q[2])[1])
    else:
        def op(q: tuple[str, int, int]) -> None:
            nonlocal points
            series, lo, hi = q
            s = int(series[1:])
            first = _fallback_key(s, lo)
            for k, _ in c.scan("ticks", start=_fallback_key(s, 0), end=first + 1, reverse=True,
                               limit=1):
                first = k
            blobs = [v for _, v in c.scan("ticks", start=first, end=_fallback_key(s, hi))]
            ts = np.concatenate([np.frombuffer(v, np.int64, len(v) // 16) for v in blobs])
            vs = np.concatenate([np.frombuffer(v, np.float64, len(v) // 16, len(v) // 2)
                                 for v in blobs])
            i, j = np.searchsorted(ts, lo), np.searchsorted(ts, hi)
            points += len(vs[i:j])

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, queries)[1]
        return points, lat

    return run
