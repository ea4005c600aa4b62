"""Remote reads through the reader pool against Redis GET via redis-py, side by side in one run.

    python bench/remote_reads.py [--rows 100000] [--rounds 3] [--shards 2] [--readers 2]
                                 [--floors]

Starts real shard owners and ``lmshardd readers`` processes (ipc in a temporary run directory)
and its own redis-server on a unix socket in a temporary directory (no persistence), loads the
same CBOR records (uint64 keys, 60-100 bytes) into both, then per round measures, each value
fetched and decoded:

- the floor: a bare pyzmq DEALER/ROUTER round trip of a get-sized frame (no lmshard), and
  the same exchange over a plain unix socket (no ZeroMQ: what redis-py does); with
  ``--floors`` also REQ/REP, tcp loopback, the ways to wait for the reply (blocking, RCVTIMEO,
  ``Socket.poll``, a ``zmq.Poller`` per request) and copy=False;
- one-by-one: a request per key (``ReaderPool.request`` get, and ``Client.get`` with local
  reads off; redis ``GET``), from 1 and from 4 client processes, and for lmshard with 1 and
  with 2 readers serving, and with 2 readers started with ``--pin-cpu``;
- batched: 1,000 keys per call (``get_many`` split per shard and sent to the pool at once;
  redis ``MGET`` and a pipeline of 1,000 ``GET``s).

Prints medians over rounds with min..max, the server's CPU time per request for the
one-by-one cases (``/proc``, all its threads), and the ratios the reader pool issue targets
(2x redis-py one-by-one, 1x MGET) beside the floor's own ratio to redis-py, which bounds the
pool's one-by-one ratio: a pool get is a pyzmq round trip plus work on both sides. Redis is a
bench-only dependency (``apt-get install redis-server``; ``pip install redis``); without either
the script says so and measures lmshard alone. The load average is printed before and after:
on a shared machine the numbers move between runs, and only the ratios from one run mean much.
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
from lmshard.protocol import GET  # noqa: E402
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
        ct = c.table("records")
        return ct, [(ct.shard(k, ct.kenc(k)), ct.kenc(k)) for k in keys]


def _pool_one_by_one(config: str, keys: list[int], go: Any, q: Any) -> None:
    ct, routed = _routed(config, keys)
    pool = ReaderPool(load_config(config))
    request, tid, loads = pool.request, ct.tid, ct.loads
    request(routed[0][0], *GET.request_for(tid, routed[0][1]))
    go.wait()
    t = time.perf_counter()
    for shard, kb in routed:
        loads(request(shard, *GET.request_for(tid, kb)))
    q.put((len(keys), time.perf_counter() - t))
    pool.close()


def _client_one_by_one(config: str, keys: list[int], go: Any, q: Any) -> None:
    """``Client.get`` with local reads off: the whole client path to the reader pool."""
    with lmshard.connect(config, local_reads=False) as c:
        get = c.get
        get("records", keys[0])
        go.wait()
        t = time.perf_counter()
        for k in keys:
            get("records", k)
        q.put((len(keys), time.perf_counter() - t))


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


FLOOR_REQUEST = b"\x01" + b"x" * 40
"""About the size of a pool get request."""
FLOOR_REPLY = b"\x01" + b"y" * 90
"""About the size of a pool get reply for these records."""


def _zmq_echo_server(endpoint: str, kind: str = "router", bound: Any = None) -> None:
    """Answers every request with FLOOR_REPLY: ROUTER (copy or not) or REP. A tcp endpoint
    without a port gets one picked by ZeroMQ, put on the ``bound`` queue."""
    import zmq

    sock = zmq.Context().socket(zmq.REP if kind == "rep" else zmq.ROUTER)
    if bound is not None:
        bound.put(f"{endpoint}:{sock.bind_to_random_port(endpoint)}")
    else:
        sock.bind(endpoint)
    if kind == "rep":
        while True:
            sock.recv()
            sock.send(FLOOR_REPLY)
    copy = kind != "router-nocopy"
    while True:
        parts = sock.recv_multipart(copy=copy)
        sock.send_multipart([parts[0], FLOOR_REPLY], copy=copy)


def _zmq_echo_client(endpoint: str, count: int, how: str, go: Any, q: Any) -> None:
    """The floor: bare pyzmq round trips of get-sized frames, no lmshard. ``how``: dealer
    (blocking recv), rcvtimeo, poll (Socket.poll), poller (a zmq.Poller per request), nocopy,
    req."""
    import zmq

    sock = zmq.Context().socket(zmq.REQ if how == "req" else zmq.DEALER)
    sock.connect(endpoint)
    if how == "rcvtimeo":
        sock.setsockopt(zmq.RCVTIMEO, 2000)
    send, recv, frame = sock.send, sock.recv, FLOOR_REQUEST
    send(frame)
    recv()
    go.wait()
    t = time.perf_counter()
    if how == "poll":
        for _ in range(count):
            send(frame)
            if sock.poll(2000):
                recv()
    elif how == "poller":
        for _ in range(count):
            send(frame)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if poller.poll(2000):
                recv()
    elif how == "nocopy":
        for _ in range(count):
            send(frame, copy=False)
            _ = recv(copy=False).bytes
    else:
        for _ in range(count):
            send(frame)
            recv()
    q.put((count, time.perf_counter() - t))


def _unix_echo_server(path: str) -> None:
    """FLOOR_REPLY for every request over a plain unix stream socket, one client at a time."""
    import socket

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(65536):
                conn.sendall(FLOOR_REPLY)


def _unix_echo_client(path: str, count: int, go: Any, q: Any) -> None:
    """The same exchange with no ZeroMQ: a send and a recv on a unix socket, as redis-py does
    (one wakeup a side per message, where ZeroMQ also wakes its I/O thread on each side)."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    send, recv, frame = sock.sendall, sock.recv, FLOOR_REQUEST
    send(frame)
    recv(65536)
    go.wait()
    t = time.perf_counter()
    for _ in range(count):
        send(frame)
        recv(65536)  # a reply of 91 bytes arrives whole on a unix socket
    q.put((count, time.perf_counter() - t))
    sock.close()


def _cpu_seconds(pids: list[int]) -> float | None:
    """CPU time these processes have run (every live thread, from the scheduler's own count
    in /proc/PID/task/TID/schedstat, which unlike the tick-sampled utime sees the short
    bursts a server runs per request), or None without /proc."""
    total = 0
    try:
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def _wait_for(endpoint: str, timeout: float = 30.0) -> None:
    """One exchange with a floor server, so it is up and warm before it is measured."""
    if endpoint.startswith(("ipc://", "tcp://")):
        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            for _ in range(3):  # a REP server needs the empty delimiter frame
                sock.send_multipart([b"", FLOOR_REQUEST])
                if not sock.poll(int(timeout * 1000)):
                    raise TimeoutError(f"floor server at {endpoint} did not answer")
                sock.recv_multipart()
        finally:
            sock.close(linger=0)
        return
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(endpoint)
                s.sendall(FLOOR_REQUEST)
                s.recv(65536)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--one-by-one", type=int, default=5000, help="keys per client, one by one")
    ap.add_argument("--batched", type=int, default=100_000, help="keys per client, batched")
    ap.add_argument("--floors", action="store_true",
                    help="also measure the floor's variants: REQ/REP, tcp, ways to wait, copy")
    args = ap.parse_args()
    n = args.rows
    rng = random.Random(7)
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} cpus)", flush=True)
    res: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def note(name: str, target: Any, args_list: list[tuple[Any, ...]],
             server: list[int] | None = None) -> None:
        """Run one workload; with ``server`` pids, also their CPU time per request."""
        before = _cpu_seconds(server) if server else None
        rate = in_processes(target, args_list)
        after = _cpu_seconds(server) if server else None
        res.setdefault(name, []).append(rate)
        line = f"  {name:<52} {rate:>10,.0f} reads/s"
        if before is not None and after is not None:
            per = (after - before) / (one * len(args_list)) * 1e6  # one-by-one cases only
            cpu.setdefault(name, []).append(per)
            line += f"  server CPU {per:5.1f} us/req"
        print(line, flush=True)

    def keys(count: int) -> list[int]:
        return [rng.randrange(n) for _ in range(count)]

    one, many = args.one_by_one, args.batched
    tmp = Path(tempfile.mkdtemp(prefix="lmsrr-"))
    cluster = Cluster(tmp / "lms", shards=args.shards, readers=args.readers, sync=False,
                      map_size="256MiB")
    readers = Readers(cluster)
    pinned = Readers(cluster, args=["--pin-cpu"])
    redis_proc, redis_sock, why = start_redis(tmp)
    if redis_proc is None:
        print(f"redis: {why}", flush=True)
    servers: list[mp.process.BaseProcess] = []
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
        run = cluster.run_dir
        floors: list[tuple[str, str, Any, tuple[Any, ...], Any, tuple[Any, ...]]] = [
            ("bare pyzmq round trip (the floor), 1 client", f"ipc://{run}/echo.sock",
             _zmq_echo_server, ("router",), _zmq_echo_client, ("dealer",)),
            ("plain unix socket round trip (no ZeroMQ)", f"{run}/unix-echo.sock",
             _unix_echo_server, (), _unix_echo_client, ()),
        ]
        if args.floors:
            ipc, tcp = f"ipc://{run}/echo.sock", "tcp://127.0.0.1"  # ZeroMQ picks the port
            floors += [
                ("floor: DEALER/ROUTER ipc, RCVTIMEO", ipc, None, (), _zmq_echo_client,
                 ("rcvtimeo",)),
                ("floor: DEALER/ROUTER ipc, Socket.poll", ipc, None, (), _zmq_echo_client,
                 ("poll",)),
                ("floor: DEALER/ROUTER ipc, a Poller per request", ipc, None, (),
                 _zmq_echo_client, ("poller",)),
                ("floor: DEALER/ROUTER ipc, copy=False", f"ipc://{run}/echo-nocopy.sock",
                 _zmq_echo_server, ("router-nocopy",), _zmq_echo_client, ("nocopy",)),
                ("floor: REQ/REP ipc", f"ipc://{run}/echo-rep.sock", _zmq_echo_server,
                 ("rep",), _zmq_echo_client, ("req",)),
                ("floor: DEALER/ROUTER tcp loopback", tcp, _zmq_echo_server, ("router",),
                 _zmq_echo_client, ("dealer",)),
                ("floor: REQ/REP tcp loopback", tcp, _zmq_echo_server, ("rep",),
                 _zmq_echo_client, ("req",)),
            ]
        spawn = mp.get_context("spawn")
        floor_pids: dict[str, int] = {}
        for i, (name, ep, server, sargs, _client, _cargs) in enumerate(floors):
            if server is None:  # the server another entry started on the same endpoint
                floor_pids[name] = next(floor_pids[f[0]] for f in floors if f[1] == ep)
                continue
            bound = spawn.Queue() if ep.startswith("tcp://") else None
            proc = spawn.Process(target=server, args=(ep, *sargs, bound) if bound is not None else
                                 (ep, *sargs), daemon=True)
            proc.start()
            servers.append(proc)
            if bound is not None:
                ep = bound.get(timeout=60)
                floors[i] = (name, ep, server, sargs, _client, _cargs)
            assert proc.pid is not None
            floor_pids[name] = proc.pid
            _wait_for(ep)
        have_redis = redis_proc is not None
        redis_pids = [redis_proc.pid] if redis_proc is not None else []
        for rnd in range(args.rounds):
            # Each lmshard figure is taken right next to the redis figure it is compared with,
            # so the ratio of a round holds even when the machine's load changes between them.
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for name, ep, _server, _sargs, client, cargs in floors:
                note(name, client, [(ep, one, *cargs)], [floor_pids[name]])
            readers.start()
            reader_pids = [p.pid for p in readers.procs.values()]
            note("pool get one-by-one, 2 readers, 1 client", _pool_one_by_one,
                 [(cfg, keys(one))], reader_pids)
            if have_redis:
                note("redis GET one-by-one, 1 client", _redis_one_by_one,
                     [(redis_sock, keys(one))], redis_pids)
            note("Client.get one-by-one (remote), 2 readers, 1 client", _client_one_by_one,
                 [(cfg, keys(one))], reader_pids)
            note("pool get one-by-one, 2 readers, 4 clients", _pool_one_by_one,
                 [(cfg, keys(one)) for _ in range(4)], reader_pids)
            if have_redis:
                note("redis GET one-by-one, 4 clients", _redis_one_by_one,
                     [(redis_sock, keys(one)) for _ in range(4)], redis_pids)
            note("pool get_many of 1,000, 2 readers, 1 client", _pool_get_many,
                 [(cfg, keys(many))])
            if have_redis:
                note("redis MGET of 1,000, 1 client", _redis_mget, [(redis_sock, keys(many))])
                note("redis pipeline of 1,000 GET, 1 client", _redis_pipeline,
                     [(redis_sock, keys(many))])
            readers.kill(1, signal.SIGTERM)  # the same, served by one reader
            note("pool get one-by-one, 1 reader, 4 clients", _pool_one_by_one,
                 [(cfg, keys(one)) for _ in range(4)])
            note("pool get_many of 1,000, 1 reader, 1 client", _pool_get_many,
                 [(cfg, keys(many))])
            readers.stop()
            # lmshardd readers --pin-cpu: each reader and its ZeroMQ I/O thread on one CPU.
            pinned.start()
            reader_pids = [p.pid for p in pinned.procs.values()]
            note("pool get one-by-one, 2 pinned readers, 1 client", _pool_one_by_one,
                 [(cfg, keys(one))], reader_pids)
            if have_redis:
                note("redis GET one-by-one, 1 client, again", _redis_one_by_one,
                     [(redis_sock, keys(one))], redis_pids)
            note("pool get one-by-one, 2 pinned readers, 4 clients", _pool_one_by_one,
                 [(cfg, keys(one)) for _ in range(4)], reader_pids)
            pinned.stop()
    finally:
        for proc in servers:
            proc.terminate()
        pinned.stop()
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
    print(f"{'workload':<52} {'reads/s':>10}  {'min..max':<17} server CPU us/req")
    for k, v in med.items():
        per = f"{statistics.median(cpu[k]):8.1f}" if k in cpu else ""
        print(f"{k:<52} {v:>10,.0f}  {f'{min(res[k]):,.0f}..{max(res[k]):,.0f}':<17} {per}")
    print("\nratios, the median (min..max) of each round's pair:")
    pairs = [
        ("pool get one-by-one, 2 readers, 1 client", "redis GET one-by-one, 1 client", 2.0),
        ("pool get one-by-one, 2 readers, 4 clients", "redis GET one-by-one, 4 clients", 2.0),
        ("pool get_many of 1,000, 2 readers, 1 client", "redis MGET of 1,000, 1 client", 1.0),
        ("pool get_many of 1,000, 2 readers, 1 client",
         "redis pipeline of 1,000 GET, 1 client", 1.0),
        ("pool get one-by-one, 2 readers, 1 client",
         "bare pyzmq round trip (the floor), 1 client", 0.0),
        ("Client.get one-by-one (remote), 2 readers, 1 client",
         "redis GET one-by-one, 1 client", 0.0),
        ("pool get one-by-one, 2 pinned readers, 1 client",
         "redis GET one-by-one, 1 client, again", 2.0),
        ("pool get one-by-one, 2 pinned readers, 1 client",
         "pool get one-by-one, 2 readers, 1 client", 0.0),
        ("pool get one-by-one, 2 pinned readers, 4 clients",
         "pool get one-by-one, 2 readers, 4 clients", 0.0),
        # The ceiling of the first ratio: a pool get is this round trip plus work on both sides.
        ("bare pyzmq round trip (the floor), 1 client", "redis GET one-by-one, 1 client", 0.0),
        ("plain unix socket round trip (no ZeroMQ)", "redis GET one-by-one, 1 client", 0.0),
    ]
    pairs += [(k, "bare pyzmq round trip (the floor), 1 client", 0.0)
              for k in res if k.startswith("floor: ")]
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
