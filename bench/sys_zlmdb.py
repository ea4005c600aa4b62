"""zlmdb's ORM in the worker process: the in-process peer (its own vendored LMDB binding).

Tables are zlmdb persistent maps in slots of one environment, as its guide declares them:
``records`` and ``users`` are ``MapOidCbor`` (uint64 keys up to 2**53, CBOR values), the unique
email index a ``MapStringOid`` attached to ``users``, ``events`` and the time series chunks
``MapStringTimestampCbor`` (zlmdb has no (str, uint64) -> CBOR map; its (str, timestamp) key is
the same 8-byte big-endian integer after the string). Fsync on commit (``sync=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import timing
from bench.procs import Run
from bench.schema import email, random_keys, record, series_name, ts_points, ts_queries

MAP_SIZE = 4 << 30
"""zlmdb's default is 10 MiB and it does not grow the map: size it for the run."""
_END = np.datetime64(2**62, "ns")


def _same(x: Any) -> Any:
    return x


class Tables:
    """The suite's tables as zlmdb maps, opened on one Database."""

    def __init__(self, spec: dict[str, Any], readonly: bool = False) -> None:
        import zlmdb

        self.db = zlmdb.Database(dbpath=spec["path"], maxsize=MAP_SIZE, sync=True,
                                 readonly=readonly)
        self.records = zlmdb.MapOidCbor(slot=1, marshal=_same, unmarshal=_same)
        self.users = zlmdb.MapOidCbor(slot=2, marshal=_same, unmarshal=_same)
        self.by_email = zlmdb.MapStringOid(slot=3)
        self.users.attach_index("by_email", self.by_email, lambda v: v["email"])
        self.events = zlmdb.MapStringTimestampCbor(slot=4, marshal=_same, unmarshal=_same)
        self.ticks = zlmdb.MapStringTimestampCbor(slot=5, marshal=_same, unmarshal=_same)


def setup(spec: dict[str, Any]) -> Run:
    Tables(spec).db.__exit__(None, None, None)
    return lambda: (0, [])


def insert_batched(spec: dict[str, Any]) -> Run:
    t = Tables(spec)
    db, records, batch = t.db, t.records, spec["batch"]
    start, count = spec["start"], spec["count"]
    rows = [record(i) for i in range(start, start + count)]
    chunks = [rows[s:s + batch] for s in range(0, count, batch)]

    def op(chunk: list[dict[str, Any]]) -> None:
        with db.begin(write=True) as txn:
            for r in chunk:
                records[txn, r["id"]] = r

    return lambda: (count, timing.each(op, chunks)[1])


def put_acked(spec: dict[str, Any]) -> Run:
    t = Tables(spec)
    db, records = t.db, t.records
    rows = [record(i) for i in range(spec["start"], spec["start"] + spec["count"])]

    def op(r: dict[str, Any]) -> None:
        with db.begin(write=True) as txn:
            records[txn, r["id"]] = r

    return lambda: timing.each(op, rows)


def get_points(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)
    db, records = t.db, t.records
    keys = random_keys(spec["seed"], spec["count"], spec["n"])

    def op(k: int) -> None:
        with db.begin() as txn:
            records[txn, k]

    return lambda: timing.sampled(op, keys)


def get_many(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)
    db, records = t.db, t.records
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    calls = [keys[s:s + spec["batch"]] for s in range(0, len(keys), spec["batch"])]

    def op(ks: list[int]) -> list[Any]:
        with db.begin() as txn:
            return [records[txn, k] for k in ks]

    return lambda: (len(keys), timing.each(op, calls)[1])


def scan_full(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)

    def run() -> tuple[int, list[int]]:
        with t.db.begin() as txn:
            # A generator around select(): iter() on zlmdb's iterator seeks back to the start.
            n, lat = timing.pages(row for row in t.records.select(txn))
        if n != spec["n"]:
            raise AssertionError(f"scanned {n} rows, expected {spec['n']}")
        return n, lat

    return run


def fill_events(spec: dict[str, Any]) -> Run:
    t = Tables(spec)

    def run() -> tuple[int, list[int]]:
        for s in range(spec["series"]):
            series = series_name(s)
            with t.db.begin(write=True) as txn:
                for seq in range(spec["per_series"]):
                    t.events[txn, (series, np.datetime64(seq, "ns"))] = record(seq)
        return spec["series"] * spec["per_series"], []

    return run


def scan_prefix(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)
    db, events = t.db, t.events
    picks = [series_name(s) for s in random_keys(spec["seed"], spec["count"], spec["series"])]
    rows = 0
    zero = np.datetime64(0, "ns")

    def op(series: str) -> None:
        nonlocal rows
        with db.begin() as txn:
            out = list(events.select(txn, from_key=(series, zero), to_key=(series, _END)))
        rows += len(out)

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, picks)[1]
        return rows, lat

    return run


def fill_users(spec: dict[str, Any]) -> Run:
    t = Tables(spec)

    def run() -> tuple[int, list[int]]:
        for s in range(0, spec["count"], 1000):
            with t.db.begin(write=True) as txn:
                for i in range(s, min(s + 1000, spec["count"])):
                    t.users[txn, i] = record(i)
        return spec["count"], []

    return run


def lookup_unique(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)
    db, users, by_email = t.db, t.users, t.by_email
    emails = [email(i) for i in random_keys(spec["seed"], spec["count"], spec["users"])]

    def op(e: str) -> None:
        with db.begin() as txn:
            users[txn, by_email[txn, e]]

    return lambda: timing.sampled(op, emails)


def mixed(spec: dict[str, Any]) -> Run:
    t = Tables(spec)
    db, records = t.db, t.records
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    every = spec["write_every"]
    items = [(i % every == every - 1, k, record(k) if i % every == every - 1 else None)
             for i, k in enumerate(keys)]

    def op(item: tuple[bool, int, Any]) -> None:
        write, k, r = item
        with db.begin(write=write) as txn:
            if write:
                records[txn, k] = r
            else:
                records[txn, k]

    return lambda: timing.each(op, items)


def ts_append(spec: dict[str, Any]) -> Run:
    t = Tables(spec)
    db, ticks, size = t.db, t.ticks, spec["per_append"]
    calls = [(series_name(s), c) for c in range(spec["appends"]) for s in spec["series_ids"]]

    def op(call: tuple[str, int]) -> None:
        series, c = call
        ts, vs = ts_points(c, size)
        with db.begin(write=True) as txn:
            ticks[txn, (series, np.datetime64(int(ts[0]), "ns"))] = {
                "t": ts.tobytes(), "v": vs.tobytes()}

    return lambda: (len(calls) * size, timing.each(op, calls)[1])


def ts_range(spec: dict[str, Any]) -> Run:
    t = Tables(spec, readonly=True)
    db, ticks = t.db, t.ticks
    queries = ts_queries(spec)
    points = 0
    zero = np.datetime64(0, "ns")

    def op(q: tuple[str, int, int]) -> None:
        nonlocal points
        series, lo, hi = q
        with db.begin() as txn:
            first = (series, np.datetime64(lo, "ns"))
            # The chunk holding `lo` is the last one starting at or before it.
            for key, _ in ticks.select(txn, from_key=(series, zero),
                                       to_key=(series, np.datetime64(lo + 1, "ns")),
                                       reverse=True, limit=1):
                first = key
            chunks = [c for _, c in ticks.select(txn, from_key=first,
                                                  to_key=(series, np.datetime64(hi, "ns")))]
        ts = np.concatenate([np.frombuffer(c["t"], np.int64) for c in chunks])
        vs = np.concatenate([np.frombuffer(c["v"], np.float64) for c in chunks])
        i, j = np.searchsorted(ts, lo), np.searchsorted(ts, hi)
        points += len(vs[i:j])

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, queries)[1]
        return points, lat

    return run

