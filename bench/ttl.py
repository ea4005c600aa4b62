"""Rows that expire: what a ttl costs reads, and what expiring rows costs the owners.

    python -m bench.ttl [--quick] [--rounds N]
    make bench                                   # runs it after the suite's workloads

Four shard owners with fsync on serving ``tests.ttl_schema`` (its ``cache`` table declared with
``ttl=0``, its ``plain`` table without), the same rows in both (the suite's ~100-byte CBOR
record, keys 0..N-1; every ``cache`` row carries an expiry an hour away, so each read does the
whole check). Point gets: one process's ``Client.get`` of random keys through its own memory
maps, the two tables in turn, the order reversed every pass; gets/s is the median over passes,
the ratio is TTL over plain (target >= 0.95). Expiry: N more rows put to expire within a
second; once the owners' sweeps deleted them, their counters give the CPU time spent (thread
time of each owner's loop inside the sweep) per 1,000 rows expired.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lmshard  # noqa: E402
from bench.report import md_table  # noqa: E402
from bench.schema import record  # noqa: E402
from lmshard.testing import LocalService  # noqa: E402

TARGET = 0.95
"""Point gets/s on a table with ttl over the same gets on a plain table (the issue's floor)."""
PASSES = 10
"""Passes over the keys per table and round (alternating the tables)."""


def _gets_per_second(c: lmshard.Client, table: str, keys: list[int]) -> float:
    get = c.get
    t0 = time.perf_counter()
    for k in keys:
        get(table, k)
    return len(keys) / (time.perf_counter() - t0)


def _gets_unchecked(c: lmshard.Client, table: str, keys: list[int]) -> float:
    """``Client.get``'s local path written out, the expiry check left out (a row of a table
    with ttl is decoded past its header, as if it were live): the same path for both tables
    gives the floor of carrying the expiry in the row, whatever the check costs."""
    from lmshard.forksafe import check_fork
    from lmshard.point_get import point_get

    tables = c.tables
    t0 = time.perf_counter()
    for k in keys:
        check_fork()
        ct = tables[table]
        kb = ct.kenc(k)
        hit = ct.local[ct.shard(k, kb)]
        data = point_get(hit[0], hit[1], kb)
        if data is not None:
            ct.loads(data)
    return len(keys) / (time.perf_counter() - t0)


def _wait_swept(c: lmshard.Client, expected: int, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        owners = [s["owner"] for s in c.stats()["shards"].values()]
        rows = sum(o["expired_rows"] for o in owners)
        if rows >= expected or time.monotonic() > deadline:
            return {"rows": rows, "cpu": sum(o["expiry_cpu_seconds"] for o in owners)}
        time.sleep(0.1)


def one_round(tmp: Path, rows: int, gets: int) -> dict[str, Any]:
    svc = LocalService(tmp, "tests.ttl_schema:schema", shards=4, python_path=[str(ROOT)],
                       sync=True)
    svc.start()
    try:
        with svc.client() as c:
            with c.writer() as w:
                for i in range(rows):
                    value = record(i)
                    w.put("plain", i, value)
                    w.put("cache", i, value, ttl=3600)
            rnd = random.Random(7)
            keys = [rnd.randrange(rows) for _ in range(gets)]
            _gets_per_second(c, "plain", keys[:1000])  # open every shard's map first
            _gets_per_second(c, "cache", keys[:1000])
            speeds: dict[str, list[float]] = {"plain": [], "cache": [], "plain_unchecked": [],
                                              "cache_unchecked": []}
            for p in range(PASSES):
                for table in ("plain", "cache") if p % 2 == 0 else ("cache", "plain"):
                    speeds[table].append(_gets_per_second(c, table, keys))
                    speeds[table + "_unchecked"].append(_gets_unchecked(c, table, keys))
            before = _wait_swept(c, 0, 0)
            expire_at = time.time() + 1.0
            with c.writer() as w:
                for i in range(rows, 2 * rows):
                    w.put("cache", i, record(i), ttl=max(0.01, expire_at - time.time()))
            after = _wait_swept(c, int(before["rows"]) + rows)
    finally:
        svc.stop()
    expired = after["rows"] - before["rows"]
    return {
        "plain_gets": statistics.median(speeds["plain"]),
        "ttl_gets": statistics.median(speeds["cache"]),
        "floor": statistics.median(speeds["cache_unchecked"]) /
        statistics.median(speeds["plain_unchecked"]),
        "expired": expired,
        "cpu_ms_per_1000": (after["cpu"] - before["cpu"]) * 1000 / max(expired, 1) * 1000,
    }


def run(quick: bool, rounds: int, tmp: Path) -> dict[str, Any]:
    rows, gets = (5_000, 20_000) if quick else (50_000, 100_000)
    out = []
    for r in range(rounds):
        out.append(one_round(tmp / f"ttl-{r}", rows, gets))
        res = out[-1]
        print(f"ttl round {r + 1}: plain {res['plain_gets']:,.0f} gets/s, ttl "
              f"{res['ttl_gets']:,.0f} gets/s; floor {res['floor']:.3f}x; "
              f"{res['expired']:,} rows expired, "
              f"{res['cpu_ms_per_1000']:.1f} ms owner CPU per 1,000", flush=True)
    plain = statistics.median(r["plain_gets"] for r in out)
    ttl = statistics.median(r["ttl_gets"] for r in out)
    return {"rounds": out, "rows": rows, "gets": gets, "plain_gets": plain, "ttl_gets": ttl,
            "ratio": ttl / plain, "target": TARGET,
            "floor": statistics.median(r["floor"] for r in out),
            "cpu_ms_per_1000": statistics.median(r["cpu_ms_per_1000"] for r in out)}


def print_summary(res: dict[str, Any]) -> None:
    verdict = "PASS" if res["ratio"] >= res["target"] else "MISS"
    print(f"\nrows that expire ({res['rows']:,} rows, {res['gets']:,} random local gets x "
          f"{PASSES} passes, medians of {len(res['rounds'])} round(s))")
    print(f"  point get, plain table      {res['plain_gets']:>12,.0f} gets/s")
    print(f"  point get, table with ttl   {res['ttl_gets']:>12,.0f} gets/s   "
          f"{res['ratio']:.3f}x plain (target >= {res['target']}x) {verdict}")
    print(f"  floor of the layout         {res['floor']:>12.3f}x  (the same get path for both "
          "tables, the expiry check left out: the header and the longer rows alone)")
    print(f"  owner CPU expiring rows     {res['cpu_ms_per_1000']:>12.1f} ms per 1,000 expired")


def markdown(res: dict[str, Any], when: str) -> list[str]:
    """The Rows that expire section of docs/performance.md (bench/report.py writes it from the
    suite's results; ``when`` says the date and the machine's load)."""
    verdict = "PASS" if res["ratio"] >= res["target"] else "MISS"
    rounds = len(res["rounds"])
    rows = [
        ["figure", "value"],
        ["point get, plain table", f"{res['plain_gets']:,.0f} gets/s"],
        ["point get, table with ttl", f"{res['ttl_gets']:,.0f} gets/s ({res['ratio']:.3f}x "
         f"plain; target >= {res['target']}x: {verdict})"],
        ["floor of the layout: the same get path for both tables, the expiry check left out",
         f"{res['floor']:.3f}x"],
        ["owner CPU expiring rows", f"{res['cpu_ms_per_1000']:.1f} ms per 1,000 expired"],
    ]
    check = (res["floor"] - res["ratio"]) * 100
    cost = ("The check itself (a clock read and one bytes comparison) takes the other "
            f"{check:.1f} points." if check > 0 else "The check itself (a clock read and one "
            "bytes comparison) costs nothing these rounds could tell from noise.")
    if res["floor"] < res["target"]:
        floor = ("The target sits above what carrying the expiry in the row costs at all: with "
                 "no check")
    else:
        floor = "Carrying the expiry in the row costs less than the target allows: with no check"
    return [
        "## Rows that expire (bench/ttl.py)",
        "",
        "`python -m bench.ttl` (and `make bench`): four owners with fsync on, "
        f"{res['rows']:,} rows of the suite's ~100-byte CBOR record in a plain table and the "
        "same rows in a table with ttl (every row carrying an expiry an hour away, so each "
        f"read does the whole check); one process's `Client.get` of {res['gets']:,} random "
        f"keys through its own memory maps, the tables alternating, {PASSES} passes, medians "
        f"of {rounds} round{'s' if rounds != 1 else ''}; then {res['rows']:,} rows put to "
        f"expire within a second and the owners' sweep CPU read from their counters. {when}.",
        "",
        md_table(rows),
        "",
        f"{floor}, only the 8-byte header (skipped with a copy of the rest) and the longer "
        f"rows, a get on the TTL table runs at {res['floor']:.3f}x in the same rounds. "
        f"{cost} How soon expired rows leave the disk is tests/test_ttl_service.py's slow "
        "drill.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ttl", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and gets, one round")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="lmshard-bench-ttl-"))
    try:
        print_summary(run(args.quick, rounds, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
