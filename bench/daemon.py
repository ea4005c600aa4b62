"""lmshard's daemon against raw in-process py-lmdb, side by side in one run.

    python bench/daemon.py [--rows 200000] [--rounds 3] [--shards 4] [--single-only]

Starts real shard owner processes (sync on), then measures:
- batched writes through the daemon (1,000 ops per batch) from 1 and 4 client processes,
  against raw in-process py-lmdb inserts of the same records (1,000 per txn, sync on): with
  ``client.batch()`` (1,000 ops split per shard, every ack awaited before the next batch) and
  with ``client.writer()`` (1,000 ops per shard batch, up to 4 batches in flight per shard);
- single acked puts from 1 and 8 concurrent client processes (group commit at work);
- local point gets through the client (routed, read-only env in-process) against raw gets.
Prints medians over rounds and ratios. With ``--single-only`` it runs the acked single puts
alone, and for them prints the owners' batches per group commit and owner CPU per put.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import lmdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lmshard  # noqa: E402
from tests.cluster import Cluster  # noqa: E402


def record(i: int) -> dict[str, object]:
    return {"id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
            "score": i * 0.5, "city": "Berlin", "tags": ["alpha", "beta", "gamma"]}


def raw_insert(path: Path, n: int) -> float:
    env = lmdb.open(str(path), map_size=1 << 31, max_dbs=4, sync=True)
    db = env.open_db(b"rows")
    dumps = cbor2.dumps
    t = time.perf_counter()
    for s in range(0, n, 1000):
        with env.begin(write=True) as txn:
            for i in range(s, min(s + 1000, n)):
                txn.put(i.to_bytes(8, "big"), dumps(record(i)), db=db)
    rate = n / (time.perf_counter() - t)
    env.close()
    return rate


def _raw_getter(path: str, keys: list[int], go: mp.Event, q: mp.Queue) -> None:  # type: ignore[name-defined]
    """Raw gets in a process of their own, started like the client's (same warm-up)."""
    env = lmdb.open(path, map_size=1 << 31, max_dbs=4, readonly=True, lock=True)
    db = env.open_db(b"rows", create=False)
    loads = cbor2.loads
    with env.begin(db=db) as txn:
        for k in keys[:64]:
            loads(txn.get(k.to_bytes(8, "big")))
    go.wait()
    t = time.perf_counter()
    for k in keys:
        txn = env.begin(db=db)
        loads(txn.get(k.to_bytes(8, "big")))
        txn.abort()
    q.put((len(keys), time.perf_counter() - t))
    env.close()


def raw_gets(path: Path, keys: list[int]) -> float:
    return in_processes(_raw_getter, [(str(path), keys)])


def _batch_writer(config: str, start: int, n: int, go: mp.Event, q: mp.Queue) -> None:  # type: ignore[name-defined]
    with lmshard.connect(config) as c:
        c.ping(0)
        go.wait()
        t = time.perf_counter()
        for s in range(start, start + n, 1000):
            with c.batch() as b:
                for i in range(s, min(s + 1000, start + n)):
                    b.put("records", i, record(i))
        q.put((n, time.perf_counter() - t))


def _pipelined_writer(config: str, start: int, n: int, go: mp.Event, q: mp.Queue) -> None:  # type: ignore[name-defined]
    with lmshard.connect(config) as c:
        c.ping(0)
        go.wait()
        t = time.perf_counter()
        with c.writer(batch_size=1000, window=4) as w:
            for i in range(start, start + n):
                w.put("records", i, record(i))
        q.put((n, time.perf_counter() - t))


def _single_putter(config: str, start: int, n: int, go: mp.Event, q: mp.Queue) -> None:  # type: ignore[name-defined]
    with lmshard.connect(config) as c:
        c.ping(0)
        go.wait()
        t = time.perf_counter()
        for i in range(start, start + n):
            c.put("blobs", i, b"x" * 100)
        q.put((n, time.perf_counter() - t))


def _getter(config: str, keys: list[int], go: mp.Event, q: mp.Queue) -> None:  # type: ignore[name-defined]
    with lmshard.connect(config) as c:
        get = c.get
        for k in keys[:64]:  # opens every shard here, as the raw side opens its environment
            get("records", k)
        go.wait()
        t = time.perf_counter()
        for k in keys:
            get("records", k)
        q.put((len(keys), time.perf_counter() - t))


def owner_figures(cl: Cluster) -> tuple[int, int, float]:
    """Batches and group commits the owners have done, and their CPU seconds so far."""
    with cl.client() as c:
        shards = c.stats()["shards"]
    batches = sum(s["owner"]["batches"] for s in shards.values())
    commits = sum(s["owner"]["commits"] for s in shards.values())
    cpu = 0.0
    for s in range(cl.config.shards):
        with open(f"/proc/{cl.pid(s)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return batches, commits, cpu


def group_figures(
    before: tuple[int, int, float], after: tuple[int, int, float], show: bool
) -> tuple[int, int, float]:
    """Print (when ``show``) batches per group commit and owner CPU per put between the two."""
    if show:
        batches, commits, cpu = (a - b for a, b in zip(after, before, strict=True))
        print(f"    {batches / max(commits, 1):.2f} batches per group commit, owners "
              f"{cpu / max(batches, 1) * 1e6:.0f} us CPU per put", flush=True)
    return after


def in_processes(target: Any, args_list: list[tuple[Any, ...]]) -> float:
    """Run workers in separate processes started together; aggregate ops/s over the span."""
    ctx = mp.get_context("spawn")
    go, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, go, q)) for a in args_list]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every worker connect and warm up
    go.set()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    total = sum(n for n, _ in results)
    return total / max(dt for _, dt in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--single", type=int, default=2000, help="acked puts per client")
    ap.add_argument("--single-only", action="store_true",
                    help="only the acked single puts, with group sizes and owner CPU per put")
    args = ap.parse_args()
    n = args.rows
    rng = random.Random(3)
    keys = [rng.randrange(n) for _ in range(n)]
    res: dict[str, list[float]] = {}

    def note(name: str, rate: float) -> None:
        res.setdefault(name, []).append(rate)
        print(f"  {name:<44} {rate:>12,.0f} ops/s", flush=True)

    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix="lmsb-"))
        cl = Cluster(tmp, shards=args.shards, map_size="256MiB", timeout_ms=20000, retries=2)
        try:
            if not args.single_only:
                note("raw py-lmdb insert, 1,000/txn, sync", raw_insert(tmp / "raw", n))
            cl.start()
            cfg = str(cl.config_path)
            if not args.single_only:
                note("daemon batched, 1 client", in_processes(_batch_writer, [(cfg, 0, n)]))
                # Gets now, while the shards hold exactly the rows the raw environment holds.
                note("raw py-lmdb get, txn per get", raw_gets(tmp / "raw", keys))
                note("client local get (routed)", in_processes(_getter, [(cfg, keys)]))
                per = n // 4
                note("daemon batched, 4 clients",
                     in_processes(_batch_writer, [(cfg, 10**7 + i * per, per) for i in range(4)]))
                note("daemon pipelined writer, 1 client",
                     in_processes(_pipelined_writer, [(cfg, 2 * 10**7, n)]))
                note("daemon pipelined writer, 4 clients",
                     in_processes(_pipelined_writer,
                                  [(cfg, 3 * 10**7 + i * per, per) for i in range(4)]))
            m = args.single
            before = owner_figures(cl)
            note("acked single put, 1 client",
                 in_processes(_single_putter, [(cfg, 0, m)]))
            before = group_figures(before, owner_figures(cl), args.single_only)
            note("acked single put, 8 clients",
                 in_processes(_single_putter, [(cfg, 10**6 * (i + 1), m) for i in range(8)]))
            group_figures(before, owner_figures(cl), args.single_only)
        finally:
            cl.stop()
            shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    raw_ins = med.get("raw py-lmdb insert, 1,000/txn, sync", 0.0)
    raw_get = med.get("raw py-lmdb get, txn per get", 0.0)
    print(f"\n{n:,} records of ~{len(cbor2.dumps(record(1)))} B CBOR, {args.shards} shards, "
          f"sync on, {args.rounds} rounds, medians (lmdb {lmdb.__version__})\n")
    print(f"{'workload':<44} {'ops/s':>12}  ratio")
    for k, v in med.items():
        ratio = ""
        if k.startswith(("daemon batched", "daemon pipelined")):
            ratio = f"{v / raw_ins:.2f}x raw insert (target 0.6x)"
        elif k.startswith("client local get"):
            ratio = f"{v / raw_get:.2f}x raw get (target 0.8x)"
        elif k == "acked single put, 8 clients":
            ratio = f"{v / med['acked single put, 1 client']:.2f}x one client (target 4x)"
        print(f"{k:<44} {v:>12,.0f}  {ratio}")


if __name__ == "__main__":
    main()
