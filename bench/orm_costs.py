"""What the ORM practices in docs/orm-guide.md cost and save, measured side by side in one run.

    python bench/orm_costs.py [--rows 20000] [--rounds 5] [--unbuffered 1000]

Four parts, each printing medians over the rounds (variants alternate order from round to round)
and a ratio against the first variant:

1. Index cost: inserting rows in batches of 1,000 into a table with no index, then with one
   unique index, + a composite index, + a nullable index, + two more plain indexes.
2. Codecs: encode and decode rates of one user record in cbor, msgpack, json and FlatBuffers
   (object API, lazy one-field read, full unpack), a 1,024-point float64 NumPy array, and a
   scaled-int64 Decimal; plus a scan reading one field of every row, cbor versus lazy
   FlatBuffers with ``store.read(buffers=True)``.
3. Buffering: storing rows with one write transaction per put (``store.put``), with a
   WriteBuffer, with a BackgroundWriter, and in one batch; each with the default ``sync=True``
   (an fsync per commit) and with ``sync=False``.
4. Time series: appending points and reading a range back.

Run it from the repository root (it imports the FlatBuffers test schema from tests/fbs).

    python bench/orm_costs.py --raw

times only raw py-lmdb with cbor2 (puts in batches of 1,000, then point gets in one read
transaction) and imports nothing else, so it also runs on interpreters lmshard does not support
yet (the guide's PyPy figures).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import cbor2
import lmdb


def raw_main(rows: int = 100_000, rounds: int = 5) -> None:
    """Raw py-lmdb + cbor2, what lmshard sits on; needs nothing newer than Python 3.9."""
    data = [{"id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
             "tags": ["alpha", "beta"]} for i in range(rows)]
    puts, gets = [], []
    for _ in range(rounds):
        d = tempfile.mkdtemp(prefix="lmshard-orm-bench-")
        env = lmdb.open(d, map_size=1 << 30, max_dbs=4)
        db = env.open_db(b"rows")
        t = time.perf_counter()
        for s in range(0, rows, 1000):
            with env.begin(write=True) as txn:
                for r in data[s : s + 1000]:
                    txn.put(r["id"].to_bytes(8, "big"), cbor2.dumps(r), db=db)
        puts.append(rows / (time.perf_counter() - t))
        t = time.perf_counter()
        with env.begin(db=db) as txn:
            for i in range(rows):
                cbor2.loads(txn.get(i.to_bytes(8, "big")))
        gets.append(rows / (time.perf_counter() - t))
        env.close()
        shutil.rmtree(d, ignore_errors=True)
    print(f"{platform.python_implementation()} {platform.python_version()}, lmdb "
          f"{lmdb.__version__}; {rows:,} rows, {rounds} rounds, medians: "
          f"put {statistics.median(puts):,.0f} rows/s, get {statistics.median(gets):,.0f} rows/s")


if __name__ == "__main__" and "--raw" in sys.argv:
    raw_main()
    sys.exit(0)

import flatbuffers  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "client"), str(ROOT)]

import lmshard  # noqa: E402
from lmshard.buffer import BackgroundWriter, WriteBuffer  # noqa: E402
from lmshard.scaled import scaled_codec  # noqa: E402
from lmshard.timeseries import TimeSeries  # noqa: E402
from tests.fbs.User import User, UserT  # noqa: E402

USERS_ID = "2c9d4e6f-8a1b-4c3d-9e5f-7a8b9c0d1e2f"
TICKS_ID = "4e6f8a0b-2c3d-4e5f-8a9b-0c1d2e3f4a5b"

Results = dict[str, dict[str, list[float]]]


def record(i: int) -> dict[str, Any]:
    return {
        "id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
        "country": ("de", "fr", "it", "es")[i % 4], "score": i * 0.5,
        "phone": f"+49-{i}" if i % 2 else None, "city": "Berlin", "team": i % 50,
        "tags": ["alpha", "beta", "gamma"],
    }


def user_t(r: dict[str, Any]) -> UserT:
    u = UserT()
    u.id, u.name, u.email, u.age, u.score, u.tags = (
        r["id"], r["name"], r["email"], r["age"], r["score"], r["tags"]
    )
    return u


def rate(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lmshard-orm-bench-"))


def note(results: Results, part: str, variant: str, value: float) -> None:
    results.setdefault(part, {}).setdefault(variant, []).append(value)


def report(title: str, by: dict[str, list[float]], unit: str) -> None:
    print(f"\n{title}\n")
    base = None
    print(f"| {'variant':<44} | {unit:>14} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 16}:|{'-' * 7}:|")
    for variant, values in by.items():
        med = statistics.median(values)
        base = base or med
        print(f"| {variant:<44} | {med:>14,.0f} | {med / base:>5.2f}x |")


# -- 1. index cost ---------------------------------------------------------------------------

INDEX_SETS: list[tuple[str, list[tuple[str, Callable[[Any], Any], bool, bool]]]] = [
    ("no index", []),
    ("+ unique by_email", [("by_email", lambda v: v["email"], True, False)]),
    ("+ composite by_country_age", [("by_country_age", lambda v: (v["country"], v["age"]),
                                     False, False)]),
    ("+ nullable unique by_phone", [("by_phone", lambda v: v["phone"], True, True)]),
    ("+ by_team, by_city (5 indexes)", [("by_team", lambda v: v["team"], False, False),
                                        ("by_city", lambda v: v["city"], False, False)]),
]


def index_round(results: Results, rows: list[dict[str, Any]], rnd: int) -> None:
    variants = list(range(len(INDEX_SETS)))
    if rnd % 2:
        variants.reverse()
    for v in variants:
        schema = lmshard.Schema("bench")
        t = schema.table("users", table_id=USERS_ID, key="uint64", value="cbor")
        for _, group in INDEX_SETS[: v + 1]:
            for name, fn, unique, nullable in group:
                t.index(name, fn, unique=unique, nullable=nullable)
        d = tmpdir()
        try:
            with lmshard.open(d, schema, map_size=1 << 30) as store:

                def insert(rows: list[dict[str, Any]] = rows, store: Any = store) -> None:
                    for s in range(0, len(rows), 1000):
                        with store.batch() as b:
                            for r in rows[s : s + 1000]:
                                b.put("users", r["id"], r)

                note(results, "index", INDEX_SETS[v][0], rate(insert, len(rows)))
        finally:
            shutil.rmtree(d, ignore_errors=True)


# -- 2. codecs -------------------------------------------------------------------------------


def each(fn: Callable[[Any], object], items: list[Any]) -> Callable[[], None]:
    """A loop calling ``fn`` on every item, results dropped (keeping them would time the
    allocator, not the codec)."""

    def run() -> None:
        for x in items:
            fn(x)

    return run


def codec_round(results: Results, rows: list[dict[str, Any]]) -> None:
    n = min(len(rows), 20_000)
    sample = rows[:n]
    fb = lmshard.flatbuffers_codec(User)
    fb_objs = [user_t(r) for r in sample]
    arrays = [np.linspace(0.0, 1.0, 1024)] * max(n // 10, 1)
    np_codec = lmshard.get_codec("numpy")
    scaled = scaled_codec(8)
    amounts = [Decimal(i).scaleb(-8) + Decimal("12345") for i in range(n)]
    for name in ("cbor", "msgpack", "json"):
        c = lmshard.get_codec(name)
        blobs = [c.dumps(r) for r in sample]
        note(results, "encode", name, rate(each(c.dumps, sample), n))
        note(results, "decode", name, rate(each(c.loads, blobs), n))
        note(results, "size", name, statistics.mean(map(len, blobs)))
    fb_blobs = [fb.dumps(o) for o in fb_objs]
    note(results, "encode", "flatbuffers (object API Pack)", rate(each(fb.dumps, fb_objs), n))
    note(results, "decode", "flatbuffers lazy, read 1 field",
         rate(each(lambda x: fb.loads(x).Email(), fb_blobs), n))
    note(results, "decode", "flatbuffers full unpack (UserT)",
         rate(each(lambda x: UserT.InitFromObj(fb.loads(x)), fb_blobs), n))
    note(results, "size", "flatbuffers", statistics.mean(map(len, fb_blobs)))
    arr_blobs = [np_codec.dumps(a) for a in arrays]
    note(results, "encode", "numpy, 1,024 float64", rate(each(np_codec.dumps, arrays),
                                                         len(arrays)))
    note(results, "decode", "numpy, 1,024 float64", rate(each(np_codec.loads, arr_blobs),
                                                         len(arrays)))
    note(results, "size", "numpy, 1,024 float64", len(arr_blobs[0]))
    s_blobs = [scaled.dumps(a) for a in amounts]
    note(results, "encode", "scaled:8 Decimal", rate(each(scaled.dumps, amounts), n))
    note(results, "decode", "scaled:8 Decimal", rate(each(scaled.loads, s_blobs), n))
    note(results, "size", "scaled:8 Decimal", 8)


WIDE_TAGS = 100
"""Tags in a "wide" record: where decoding whole rows starts to cost more than lazy reads."""


def lazy_scan_round(results: Results, rows: list[dict[str, Any]], rnd: int, wide: bool) -> None:
    """Read one field of every row: cbor decodes whole rows, FlatBuffers reads one field."""
    schema = lmshard.Schema("bench")
    schema.table("cbor_users", table_id=USERS_ID, key="uint64", value="cbor")
    schema.table("fb_users", table_id=TICKS_ID, key="uint64",
                 value=lmshard.flatbuffers_codec(User))
    if wide:
        tags = [f"tag-{j:04d}" for j in range(WIDE_TAGS)]
        rows = [dict(r, tags=tags) for r in rows]
    fb = lmshard.flatbuffers_codec(User)
    packed = [fb.dumps(user_t(r)) for r in rows]  # slow work before the write transaction
    d = tmpdir()
    try:
        with lmshard.open(d, schema, map_size=1 << 30, sync=False) as store:
            with store.batch() as b:
                for r, buf in zip(rows, packed, strict=True):
                    b.put("cbor_users", r["id"], r)
                    b.put("fb_users", r["id"], buf)

            def cbor() -> None:
                with store.read() as r:
                    for _, v in r.scan("cbor_users"):
                        v["email"]

            def lazy() -> None:
                with store.read(buffers=True) as r:
                    for _, v in r.scan("fb_users"):
                        v.Email()

            order = [("cbor, whole row decoded", cbor), ("flatbuffers, buffers=True", lazy)]
            for name, fn in order if rnd % 2 == 0 else order[::-1]:
                note(results, "lazy wide" if wide else "lazy", name, rate(fn, len(rows)))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- 3. buffering ----------------------------------------------------------------------------


def buffer_round(results: Results, rows: list[dict[str, Any]], unbuffered: int, rnd: int) -> None:
    schema = lmshard.Schema("bench")
    schema.table("users", table_id=USERS_ID, key="uint64", value="cbor")

    def one_txn_per_put(store: Any, part: list[dict[str, Any]]) -> None:
        for r in part:
            store.put("users", r["id"], r)

    def write_buffer(store: Any, part: list[dict[str, Any]]) -> None:
        with WriteBuffer(store, max_ops=1000, max_delay=0.05) as buf:
            for r in part:
                buf.put("users", r["id"], r)

    def background(store: Any, part: list[dict[str, Any]]) -> None:
        with BackgroundWriter(store, max_ops=1000, max_delay=0.05) as w:
            t = time.perf_counter()
            for r in part:
                w.put("users", r["id"], r)
            enqueued.append(len(part) / (time.perf_counter() - t))

    enqueued: list[float] = []

    def one_batch(store: Any, part: list[dict[str, Any]]) -> None:
        with store.batch() as b:
            for r in part:
                b.put("users", r["id"], r)

    variants = [("one write txn per put", one_txn_per_put), ("WriteBuffer(max_ops=1000)",
                write_buffer), ("BackgroundWriter(max_ops=1000)", background),
                ("one batch", one_batch)]
    for sync in (True, False):
        for name, fn in variants if rnd % 2 == 0 else variants[::-1]:
            part = rows[:unbuffered] if fn is one_txn_per_put else rows
            d = tmpdir()
            try:
                with lmshard.open(d, schema, map_size=1 << 30, sync=sync) as store:
                    note(results, f"buffer sync={sync}", name,
                         rate(lambda fn=fn, store=store, part=part: fn(store, part), len(part)))
                    assert store.count("users") == len(part)
                if enqueued:
                    note(results, f"buffer sync={sync}", "BackgroundWriter, producer side only",
                         enqueued.pop())
            finally:
                shutil.rmtree(d, ignore_errors=True)


# -- 4. time series --------------------------------------------------------------------------


def timeseries_round(results: Results, points: int) -> None:
    schema = lmshard.Schema("bench")
    ticks = TimeSeries(schema, "ticks", table_id=TICKS_ID)
    ts = np.arange(points, dtype=np.int64) * 1_000_000
    vs = np.random.default_rng(1).random(points)
    d = tmpdir()
    try:
        with lmshard.open(d, schema, map_size=1 << 30) as store:
            note(results, "ts", "append, one call", rate(lambda: ticks.append(store, "s", ts, vs),
                                                         points))
            note(results, "ts", "range, whole series", rate(lambda: ticks.range(store, "s"),
                                                            points))
            small = 10_000
            note(results, "ts", "append, 10,000 calls of 1 point",
                 rate(lambda: [ticks.append(store, "t", [int(t)], [1.0])
                               for t in ts[:small]], small))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows per workload")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--unbuffered", type=int, default=1_000,
                    help="rows for the one-txn-per-put variant (it is slow with sync=True)")
    ap.add_argument("--points", type=int, default=1_000_000, help="time series points")
    ap.add_argument("--raw", action="store_true",
                    help="only raw py-lmdb + cbor2 (handled before lmshard is imported)")
    args = ap.parse_args()
    rows = [record(i) for i in range(args.rows)]
    results: Results = {}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds} ...", flush=True)
        index_round(results, rows, rnd)
        codec_round(results, rows)
        lazy_scan_round(results, rows, rnd, wide=False)
        lazy_scan_round(results, rows, rnd, wide=True)
        buffer_round(results, rows, args.unbuffered, rnd)
        timeseries_round(results, args.points)

    print(f"\n{platform.python_implementation()} {platform.python_version()}, lmdb "
          f"{lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))}), numpy "
          f"{np.__version__}, flatbuffers {flatbuffers.__version__}; {os.cpu_count()} CPUs; "
          f"{args.rows:,} rows, {args.rounds} rounds, medians")
    report(f"1. Inserting {args.rows:,} rows, 1,000 per batch (each line adds indexes)",
           results["index"], "rows/s")
    report("2a. Encoding one user record (numpy: one array)", results["encode"], "values/s")
    report("2b. Decoding it", results["decode"], "values/s")
    report("2c. Encoded size", results["size"], "bytes")
    report(f"2d. Scan of {args.rows:,} rows reading one field", results["lazy"], "rows/s")
    report(f"2e. The same with {WIDE_TAGS} tags per row", results["lazy wide"], "rows/s")
    for sync in (True, False):
        report(f"3. Storing rows, sync={sync} (one txn per put: {args.unbuffered:,} rows)",
               results[f"buffer sync={sync}"], "rows/s")
    report(f"4. Time series, {args.points:,} float64 points", results["ts"], "points/s")


if __name__ == "__main__":
    main()
