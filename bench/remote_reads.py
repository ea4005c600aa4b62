"""Remote reads through the reader pool against Redis GET via redis-py, side by side in one run.

    python bench/remote_reads.py [--rows 100000] [--rounds 3] [--shards 2] [--readers 2]

Starts real shard owners and ``lmshardd readers`` processes (ipc in a temporary run directory)
and its own redis-server on a unix socket in a temporary directory (no persistence), loads the
same CBOR records (uint64 keys, 60-100 bytes) into both, then per round measures, each value
fetched and decoded:

- the floor: a bare pyzmq DEALER/ROUTER round trip of a get-sized frame (no lmshard);
- one-by-one: a request per key (``ReaderPool.request`` get; redis ``GET``), from 1 and from
  4 client processes, and for lmshard with 1 and with 2 readers serving;
- batched: 1,000 keys per call (``get_many`` split per shard and sent to the pool at once;
  redis ``MGET`` and a pipeline of 1,000 ``GET``s).

Prints medians over rounds with min..max, and the ratios the reader pool issue targets
(2x redis-py one-by-one, 1x MGET). Redis is a bench-only dependency
(``apt-get install redis-server``; ``pip install redis``); without either the script says so and
measures lmshard alone. The load average is printed before and after: on a shared machine the
numbers move between runs, and only the ratios from one run mean much.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lmshard  # noqa: E402
from bench.daemon import in_processes  # noqa: E402
from lmshard.config import load_config  # noqa: E402
from lmshard.remote import ReaderPool  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.test_readers import Readers  # noqa: E402

BATCH = 1000
"""Keys per get_many / MGET / pipeline."""


def record(i: int) -> dict[str, object]:
    return {"id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
            "score": i * 0.5}


# -- redis --------------------------------------------------------------------------------------


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes] | None, str, str]:
    """(process, unix socket path, why not) for a private redis-server, or None and a reason."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None, "", "redis-server not found (apt-get install redis-server): no redis side"
    try:
        import redis  # noqa: F401
    except ImportError:
        return None, "", "redis-py not installed (pip install redis): no redis side"
    sock = str(tmp / "redis.sock")
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return None, "", "redis-server did not start"
        time.sleep(0.05)
    return proc, sock, ""


def load_redis(sock: str, n: int) -> None:
    import redis

    r = redis.Redis(unix_socket_path=sock)
    for s in range(0, n, BATCH):
        p = r.pipeline(transaction=False)
        for i in range(s, min(s + BATCH, n)):
            p.set(i, cbor2.dumps(record(i)))
        p.execute()
    r.close()


def _redis_one_by_one(sock: str, keys: list[int], go: Any, q: Any) -> None:
    import redis

    r = redis.Redis(unix_socket_path=sock)
    get, loads = r.get, cbor2.loads
    get(keys[0])
    go.wait()
    t = time.perf_counter()
    for k in keys:
        loads(get(k))
    q.put((len(keys), time.perf_counter() - t))


def _redis_mget(sock: str, keys: list[int], go: Any, q: Any) -> None:
    import redis

    r = redis.Redis(unix_socket_path=sock)
    loads = cbor2.loads
    r.get(keys[0])
    go.wait()
    t = time.perf_counter()
    for s in range(0, len(keys), BATCH):
        for v in r.mget(keys[s:s + BATCH]):
            loads(v)
    q.put((len(keys), time.perf_counter() - t))


def _redis_pipeline(sock: str, keys: list[int], go: Any, q: Any) -> None:
    import redis

    r = redis.Redis(unix_socket_path=sock)
    loads = cbor2.loads
    r.get(keys[0])
    go.wait()
    t = time.perf_counter()
    for s in range(0, len(keys), BATCH):
        p = r.pipeline(transaction=False)
        for k in keys[s:s + BATCH]:
            p.get(k)
        for v in p.execute():
            loads(v)
    q.put((len(keys), time.perf_counter() - t))


# -- lmshard ------------------------------------------------------------------------------------


def _routed(config: str, keys: list[int]) -> tuple[Any, list[tuple[int, bytes]]]:
    with lmshard.connect(config, local_reads=False) as c:
        ct = c._table("records")
        return ct, [(c._route(ct, k, ct.kenc(k)), ct.kenc(k)) for k in keys]


def _pool_one_by_one(config: str, keys: list[int], go: Any, q: Any) -> None:
    ct, routed = _routed(config, keys)
    pool = ReaderPool(load_config(config))
    request, tid, loads = pool.request, ct.tid, ct.loads
    request(routed[0][0], 10, [tid, routed[0][1]])
    go.wait()
    t = time.perf_counter()
    for shard, kb in routed:
        loads(request(shard, 10, [tid, kb]))
    q.put((len(keys), time.perf_counter() - t))
    pool.close()


def _pool_get_many(config: str, keys: list[int], go: Any, q: Any) -> None:
    ct, routed = _routed(config, keys)
    pool = ReaderPool(load_config(config))
    tid, loads = ct.tid, ct.loads
    batches = []
    for s in range(0, len(routed), BATCH):
        by_shard: dict[int, list[bytes]] = {}
        for shard, kb in routed[s:s + BATCH]:
            by_shard.setdefault(shard, []).append(kb)
        batches.append([(shard, 11, [tid, kbs]) for shard, kbs in by_shard.items()])
    pool.requests(batches[0])
    go.wait()
    t = time.perf_counter()
    for parts in batches:
        for values in pool.requests(parts):
            for v in values:
                loads(v)
    q.put((len(keys), time.perf_counter() - t))
    pool.close()


def _zmq_echo_server(endpoint: str) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _zmq_echo_client(endpoint: str, count: int, go: Any, q: Any) -> None:
    """The floor: a bare pyzmq DEALER/ROUTER round trip of a get-sized frame, no lmshard."""
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    frame = b"\x01" + b"x" * 40
    sock.send(frame)
    sock.recv()
    go.wait()
    t = time.perf_counter()
    for _ in range(count):
        sock.send(frame)
        sock.recv()
    q.put((count, time.perf_counter() - t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--one-by-one", type=int, default=5000, help="keys per client, one by one")
    ap.add_argument("--batched", type=int, default=100_000, help="keys per client, batched")
    args = ap.parse_args()
    n = args.rows
    rng = random.Random(7)
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} cpus)", flush=True)
    res: dict[str, list[float]] = {}

    def note(name: str, rate: float) -> None:
        res.setdefault(name, []).append(rate)
        print(f"  {name:<46} {rate:>12,.0f} reads/s", flush=True)

    def keys(count: int) -> list[int]:
        return [rng.randrange(n) for _ in range(count)]

    tmp = Path(tempfile.mkdtemp(prefix="lmsrr-"))
    cluster = Cluster(tmp / "lms", shards=args.shards, readers=args.readers, sync=False,
                      map_size="256MiB")
    readers = Readers(cluster)
    redis_proc, redis_sock, why = start_redis(tmp)
    if redis_proc is None:
        print(f"redis: {why}", flush=True)
    try:
        cluster.start()
        with cluster.client() as c:
            for s in range(0, n, BATCH):
                with c.batch() as b:
                    for i in range(s, min(s + BATCH, n)):
                        b.put("records", i, record(i))
        if redis_proc is not None:
            load_redis(redis_sock, n)
            print(f"redis-server {redis_sock} (started by this script, no persistence)")
        cfg = str(cluster.config_path)
        one, many = args.one_by_one, args.batched
        echo_ep = f"ipc://{cluster.run_dir}/echo.sock"
        echo = mp.get_context("spawn").Process(target=_zmq_echo_server, args=(echo_ep,),
                                               daemon=True)
        echo.start()
        have_redis = redis_proc is not None
        for rnd in range(args.rounds):
            # Each lmshard figure is taken right next to the redis figure it is compared with,
            # so the ratio of a round holds even when the machine's load changes between them.
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            note("bare pyzmq round trip (the floor), 1 client",
                 in_processes(_zmq_echo_client, [(echo_ep, one)]))
            readers.start()
            note("pool get one-by-one, 2 readers, 1 client",
                 in_processes(_pool_one_by_one, [(cfg, keys(one))]))
            if have_redis:
                note("redis GET one-by-one, 1 client",
                     in_processes(_redis_one_by_one, [(redis_sock, keys(one))]))
            note("pool get one-by-one, 2 readers, 4 clients",
                 in_processes(_pool_one_by_one, [(cfg, keys(one)) for _ in range(4)]))
            if have_redis:
                note("redis GET one-by-one, 4 clients",
                     in_processes(_redis_one_by_one, [(redis_sock, keys(one)) for _ in range(4)]))
            note("pool get_many of 1,000, 2 readers, 1 client",
                 in_processes(_pool_get_many, [(cfg, keys(many))]))
            if have_redis:
                note("redis MGET of 1,000, 1 client",
                     in_processes(_redis_mget, [(redis_sock, keys(many))]))
                note("redis pipeline of 1,000 GET, 1 client",
                     in_processes(_redis_pipeline, [(redis_sock, keys(many))]))
            readers.kill(1, signal.SIGTERM)  # the same, served by one reader
            note("pool get one-by-one, 1 reader, 4 clients",
                 in_processes(_pool_one_by_one, [(cfg, keys(one)) for _ in range(4)]))
            note("pool get_many of 1,000, 1 reader, 1 client",
                 in_processes(_pool_get_many, [(cfg, keys(many))]))
            readers.stop()
        echo.terminate()
    finally:
        readers.stop()
        cluster.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nload average after: {os.getloadavg()}")
    print(f"\n{n:,} records of ~{len(cbor2.dumps(record(n // 2)))} B CBOR, {args.shards} shards, "
          f"{args.rounds} rounds, medians (min..max); every value fetched and decoded\n")
    print(f"{'workload':<46} {'reads/s':>10}  {'min..max':<19}")
    for k, v in med.items():
        print(f"{k:<46} {v:>10,.0f}  {min(res[k]):,.0f}..{max(res[k]):,.0f}")
    print("\nratios, the median (min..max) of each round's pair:")
    pairs = [
        ("pool get one-by-one, 2 readers, 1 client", "redis GET one-by-one, 1 client", 2.0),
        ("pool get one-by-one, 2 readers, 4 clients", "redis GET one-by-one, 4 clients", 2.0),
        ("pool get_many of 1,000, 2 readers, 1 client", "redis MGET of 1,000, 1 client", 1.0),
        ("pool get_many of 1,000, 2 readers, 1 client",
         "redis pipeline of 1,000 GET, 1 client", 1.0),
        ("pool get one-by-one, 2 readers, 1 client",
         "bare pyzmq round trip (the floor), 1 client", 0.0),
    ]
    for ours, theirs, goal in pairs:
        if ours in res and theirs in res:
            r = [a / b for a, b in zip(res[ours], res[theirs], strict=True)]
            target = f"  (target {goal:g}x)" if goal else ""
            print(f"  {ours} / {theirs}: {statistics.median(r):.2f}x "
                  f"({min(r):.2f}..{max(r):.2f}){target}")
    for what in ("get one-by-one, {} 4 clients", "get_many of 1,000, {} 1 client"):
        one_r, two_r = (res.get("pool " + what.format(m)) for m in ("1 reader,", "2 readers,"))
        if one_r and two_r:
            r = [a / b for a, b in zip(two_r, one_r, strict=True)]
            print(f"  2 readers / 1 reader, {what.format('').replace('  ', ' ')}: "
                  f"{statistics.median(r):.2f}x ({min(r):.2f}..{max(r):.2f}; "
                  f"{os.cpu_count()} cpus shared by clients and readers)")


if __name__ == "__main__":
    main()
