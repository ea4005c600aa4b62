"""Raw py-lmdb + cbor2 in the worker process: the ceiling every other system is held against.

One environment, a named database per table, 8-byte big-endian keys, cbor2 values, a
hand-kept unique index database, fsync on commit (``sync=True``), no table layer at all.
Each function is a workload: it sets up untimed and returns the timed ``run`` (bench.procs).
"""

from __future__ import annotations

from typing import Any

import cbor2
import lmdb
import numpy as np

from bench import timing
from bench.procs import Run
from bench.schema import (
    email,
    random_keys,
    record,
    series_name,
    ts_points,
    ts_queries,
)

MAP_SIZE = 4 << 30
"""Virtual map size; the file grows only with data."""


def _open(spec: dict[str, Any], readonly: bool = False) -> tuple[lmdb.Environment, dict[str, Any]]:
    env = lmdb.open(spec["path"], map_size=MAP_SIZE, max_dbs=8, sync=True, readonly=readonly,
                    lock=True)
    names = ("records", "users", "by_email", "events", "ticks")
    if readonly:
        dbs = {n: env.open_db(n.encode(), create=False) for n in names}
    else:
        with env.begin(write=True) as txn:
            dbs = {n: env.open_db(n.encode(), txn=txn) for n in names}
    return env, dbs


def _k(i: int) -> bytes:
    return i.to_bytes(8, "big")


def setup(spec: dict[str, Any]) -> Run:
    """Create the environment and its databases (nothing timed)."""
    _open(spec)[0].close()
    return lambda: (0, [])


def insert_batched(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db, batch = dbs["records"], spec["batch"]
    start, count = spec["start"], spec["count"]
    rows = [record(i) for i in range(start, start + count)]
    chunks = [rows[s:s + batch] for s in range(0, count, batch)]
    dumps = cbor2.dumps

    def op(chunk: list[dict[str, Any]]) -> None:
        with env.begin(write=True, db=db) as txn:
            put = txn.put
            for r in chunk:
                put(r["id"].to_bytes(8, "big"), dumps(r))

    return lambda: (count, timing.each(op, chunks)[1])


def put_acked(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db = dbs["records"]
    rows = [record(i) for i in range(spec["start"], spec["start"] + spec["count"])]
    dumps = cbor2.dumps

    def op(r: dict[str, Any]) -> None:
        with env.begin(write=True, db=db) as txn:
            txn.put(r["id"].to_bytes(8, "big"), dumps(r))

    return lambda: timing.each(op, rows)


def get_points(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db, begin, loads = dbs["records"], env.begin, cbor2.loads
    keys = random_keys(spec["seed"], spec["count"], spec["n"])

    def op(k: int) -> None:
        txn = begin(db=db)
        loads(txn.get(k.to_bytes(8, "big")))
        txn.abort()

    return lambda: timing.sampled(op, keys)


def get_many(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db, begin, loads = dbs["records"], env.begin, cbor2.loads
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    calls = [keys[s:s + spec["batch"]] for s in range(0, len(keys), spec["batch"])]

    def op(ks: list[int]) -> list[Any]:
        with begin(db=db) as txn:
            get = txn.get
            return [loads(get(k.to_bytes(8, "big"))) for k in ks]

    return lambda: (len(keys), timing.each(op, calls)[1])


def scan_full(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db, loads = dbs["records"], cbor2.loads

    def run() -> tuple[int, list[int]]:
        with env.begin(db=db) as txn:
            rows = ((int.from_bytes(k, "big"), loads(v)) for k, v in txn.cursor())
            n, lat = timing.pages(rows)
        if n != spec["n"]:
            raise AssertionError(f"scanned {n} rows, expected {spec['n']}")
        return n, lat

    return run


def fill_events(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db, dumps = dbs["events"], cbor2.dumps

    def run() -> tuple[int, list[int]]:
        for s in range(spec["series"]):
            prefix = series_name(s).encode()
            with env.begin(write=True, db=db) as txn:
                for seq in range(spec["per_series"]):
                    txn.put(prefix + _k(seq), dumps(record(seq)))
        return spec["series"] * spec["per_series"], []

    return run


def scan_prefix(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db, loads = dbs["events"], cbor2.loads
    picks = [series_name(s) for s in random_keys(spec["seed"], spec["count"], spec["series"])]
    rows = 0

    def op(series: str) -> None:
        nonlocal rows
        prefix = series.encode()
        with env.begin(db=db) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            out = []
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                out.append(((k[:-8].decode(), int.from_bytes(k[-8:], "big")), loads(v)))
        rows += len(out)

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, picks)[1]
        return rows, lat

    return run


def fill_users(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db, ix, dumps = dbs["users"], dbs["by_email"], cbor2.dumps

    def run() -> tuple[int, list[int]]:
        for s in range(0, spec["count"], 1000):
            with env.begin(write=True) as txn:
                for i in range(s, min(s + 1000, spec["count"])):
                    k = _k(i)
                    txn.put(k, dumps(record(i)), db=db)
                    if not txn.put(email(i).encode(), k, db=ix, overwrite=False):
                        raise AssertionError("duplicate email")
        return spec["count"], []

    return run


def lookup_unique(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db, ix, begin, loads = dbs["users"], dbs["by_email"], env.begin, cbor2.loads
    emails = [email(i) for i in random_keys(spec["seed"], spec["count"], spec["users"])]

    def op(e: str) -> None:
        txn = begin()
        loads(txn.get(txn.get(e.encode(), db=ix), db=db))
        txn.abort()

    return lambda: timing.sampled(op, emails)


def mixed(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db, begin, loads, dumps = dbs["records"], env.begin, cbor2.loads, cbor2.dumps
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    every = spec["write_every"]
    items = [(i % every == every - 1, k, record(k) if i % every == every - 1 else None)
             for i, k in enumerate(keys)]

    def op(item: tuple[bool, int, Any]) -> None:
        write, k, r = item
        if write:
            with begin(write=True, db=db) as txn:
                txn.put(k.to_bytes(8, "big"), dumps(r))
        else:
            txn = begin(db=db)
            loads(txn.get(k.to_bytes(8, "big")))
            txn.abort()

    return lambda: timing.each(op, items)


def _ts_key(series: str, start: int) -> bytes:
    return series.encode() + start.to_bytes(8, "big")


def ts_append(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec)
    db, size = dbs["ticks"], spec["per_append"]
    calls = [(series_name(s), c) for c in range(spec["appends"]) for s in spec["series_ids"]]

    def op(call: tuple[str, int]) -> None:
        series, c = call
        ts, vs = ts_points(c, size)
        with env.begin(write=True, db=db) as txn:
            txn.put(_ts_key(series, int(ts[0])), ts.tobytes() + vs.tobytes())

    return lambda: (len(calls) * size, timing.each(op, calls)[1])


def ts_range(spec: dict[str, Any]) -> Run:
    env, dbs = _open(spec, readonly=True)
    db = dbs["ticks"]
    queries = ts_queries(spec)
    points = 0

    def op(q: tuple[str, int, int]) -> None:
        nonlocal points
        series, lo, hi = q
        prefix = series.encode()
        with env.begin(db=db) as txn:
            cur = txn.cursor()
            # The chunk holding `lo` is the last one starting at or before it.
            found = cur.prev() if cur.set_range(_ts_key(series, lo + 1)) else cur.last()
            if not found or not cur.key().startswith(prefix):
                cur.set_range(prefix)
            end = _ts_key(series, hi)
            tparts, vparts = [], []
            for k, v in cur:
                if k >= end or not k.startswith(prefix):
                    break
                n = len(v) // 16
                tparts.append(np.frombuffer(v, np.int64, n))
                vparts.append(np.frombuffer(v, np.float64, n, 8 * n))
        ts, vs = np.concatenate(tparts), np.concatenate(vparts)
        i, j = np.searchsorted(ts, lo), np.searchsorted(ts, hi)
        points += len(vs[i:j])

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, queries)[1]
        return points, lat

    return run

