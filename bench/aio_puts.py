"""Acked single puts from one process: 64 coroutines on ``lmshard.aio`` against the sync
client's one-at-a-time puts, and against ``redis.asyncio`` with 64 coroutines.

    python -m bench.aio_puts [--quick] [--rounds N] [--concurrency 64]
    make bench                                   # runs it after the suite's workloads

Four shard owners with fsync on (``tests.cluster.Cluster``, as the suite's lmshard) and a private
redis-server on a unix socket with ``appendonly yes`` + ``appendfsync always`` (every acked write
fsynced, as the suite's acked-write workloads set it). Each round runs the three in turn, the
order reversed every other round, each writing new rows (the suite's ~100-byte CBOR record) from
this process: the sync ``Client`` one put at a time; ``AsyncClient`` with ``--concurrency``
coroutines, each putting its share one at a time (so that many puts are in flight); the same
with ``redis.asyncio`` (a connection pool, one connection per coroutine). Prints puts/s per
round, the medians and the ratios of medians (target: async >= 4x sync).
"""

from __future__ import annotations

import argparse
import asyncio
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

import cbor2  # noqa: E402

import lmshard  # noqa: E402
import lmshard.aio  # noqa: E402
from bench.schema import record  # noqa: E402
from bench.sys_redis import RedisServer  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

CONCURRENCY = 64
"""Coroutines putting at once in the async runs."""
TARGET = 4.0
"""Async puts/s over the sync client's one-at-a-time puts/s that the issue asks for."""


def sync_puts(config: Any, start: int, count: int) -> float:
    """Puts/s of one sync client putting ``count`` rows one at a time."""
    rows = [record(i) for i in range(start, start + count)]
    with lmshard.connect(config) as c:
        put = c.put
        t = time.perf_counter()
        for r in rows:
            put("records", r["id"], r)
        return count / (time.perf_counter() - t)


async def _each(concurrency: int, count: int, put: Any) -> float:
    """Puts/s of ``concurrency`` coroutines putting rows 0..count-1 between them."""
    async def worker(k: int) -> None:
        for i in range(k, count, concurrency):
            await put(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return count / (time.perf_counter() - t)


async def aio_puts(config: Any, start: int, count: int, concurrency: int) -> float:
    rows = [record(i) for i in range(start, start + count)]
    async with lmshard.aio.connect(config) as c:
        await c.put("records", rows[0]["id"], rows[0])  # the sockets are open

        async def put(i: int) -> None:
            await c.put("records", rows[i]["id"], rows[i])

        return await _each(concurrency, count, put)


async def redis_puts(socket: str, start: int, count: int, concurrency: int) -> float:
    import redis.asyncio

    rows = [(b"r" + i.to_bytes(8, "big"), cbor2.dumps(record(i)))
            for i in range(start, start + count)]
    r = redis.asyncio.Redis(unix_socket_path=socket, max_connections=concurrency)
    try:
        await asyncio.gather(*(r.ping() for _ in range(concurrency)))  # the connections open

        async def put(i: int) -> None:
            await r.set(*rows[i])

        return await _each(concurrency, count, put)
    finally:
        await r.aclose()


def run(quick: bool, rounds: int, tmp: Path, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """Every round's puts/s per system, their medians and the ratios of medians."""
    n_sync, n_async = (150, 1500) if quick else (500, 8000)
    runs: dict[str, list[float]] = {"sync": [], "aio": [], "redis_asyncio": []}
    redis_missing = RedisServer.missing()
    redis = None if redis_missing else RedisServer(tmp / "aio-redis")
    cluster = Cluster(tmp / "aio-owners")
    try:
        cluster.start()
        if redis is not None:
            redis.start()
            redis.durable(True)
        steps = [
            ("sync", lambda start: sync_puts(cluster.config, start, n_sync)),
            ("aio", lambda start: asyncio.run(
                aio_puts(cluster.config, start, n_async, concurrency))),
        ]
        if redis is not None:
            socket = redis.socket
            steps.append(("redis_asyncio", lambda start: asyncio.run(
                redis_puts(socket, start, n_async, concurrency))))
        for rnd in range(rounds):
            for n, (name, step) in enumerate(steps if rnd % 2 == 0 else steps[::-1]):
                ops = step(10**8 * (rnd + 1) + 10**7 * n)
                runs[name].append(ops)
                print(f"  aio round {rnd + 1}/{rounds} {name:<14} {ops:>10,.0f} puts/s",
                      flush=True)
    finally:
        cluster.stop()
        if redis is not None:
            redis.stop()
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    ratios = {"aio_over_sync": med["aio"] / med["sync"]}
    if "redis_asyncio" in med:
        ratios["aio_over_redis_asyncio"] = med["aio"] / med["redis_asyncio"]
    return {"concurrency": concurrency, "puts": {"sync": n_sync, "async": n_async},
            "runs": runs, "median": med, "ratios": ratios, "redis_skipped": redis_missing}


def print_summary(res: dict[str, Any]) -> None:
    med, ratios, c = res["median"], res["ratios"], res["concurrency"]
    print(f"\nacked single puts from one process (fsync on; medians of {len(res['runs']['sync'])}"
          " rounds)")
    print(f"  sync Client, one at a time       {med['sync']:>10,.0f} puts/s")
    print(f"  AsyncClient, {c} coroutines       {med['aio']:>10,.0f} puts/s")
    if "redis_asyncio" in med:
        print(f"  redis.asyncio, {c} coroutines     {med['redis_asyncio']:>10,.0f} puts/s "
              "(appendfsync always)")
    r = ratios["aio_over_sync"]
    print(f"  async / sync: {r:.1f}x (target >= {TARGET:.0f}x: "
          f"{'PASS' if r >= TARGET else 'MISS'})")
    if "aio_over_redis_asyncio" in ratios:
        print(f"  async / redis.asyncio: {ratios['aio_over_redis_asyncio']:.2f}x")
    else:
        print(f"  redis.asyncio: skipped: {res['redis_skipped']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.aio_puts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer puts: a check that it runs")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lmshard-aio-bench-"))
    try:
        res = run(args.quick, args.rounds or (1 if args.quick else 3), tmp, args.concurrency)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_summary(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
