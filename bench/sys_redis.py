"""Redis with redis-py over a unix socket: the networked peer.

The suite starts its own ``redis-server`` (no persistence, unix socket only) in a temporary
directory; the acked-write workloads switch it to ``appendonly yes`` + ``appendfsync always`` so
an acknowledged SET is on disk, like an lmshard put (the fsync-each-second puts to
``appendfsync everysec``, like lmshard's ``durability.flush_interval = 1``). Layout:
``r<8-byte id>`` -> CBOR record; users ``u<id>`` plus ``e:<email>`` -> id; each event series a
sorted set (score = sequence, member = CBOR value); each time series chunk
``t:<series><start>`` -> NumPy bytes, with a sorted set ``ti:<series>`` of chunk starts to find
them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from bench import timing
from bench.procs import Run
from bench.schema import email, random_keys, record, series_name, ts_points, ts_queries

PIPELINE = 1000
"""Commands per pipeline for fills."""


def _client(spec: dict[str, Any]) -> Any:
    import redis

    r = redis.Redis(unix_socket_path=spec["socket"])
    r.ping()
    return r


def _k(i: int) -> bytes:
    return b"r" + i.to_bytes(8, "big")


def insert_batched(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    batch, start, count = spec["batch"], spec["start"], spec["count"]
    rows = [record(i) for i in range(start, start + count)]
    chunks = [rows[s:s + batch] for s in range(0, count, batch)]
    dumps = cbor2.dumps

    def op(chunk: list[dict[str, Any]]) -> None:
        pipe = r.pipeline(transaction=False)
        for row in chunk:
            pipe.set(b"r" + row["id"].to_bytes(8, "big"), dumps(row))
        pipe.execute()

    return lambda: (count, timing.each(op, chunks)[1])


def put_acked(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    rows = [record(i) for i in range(spec["start"], spec["start"] + spec["count"])]
    set_, dumps = r.set, cbor2.dumps

    def op(row: dict[str, Any]) -> None:
        set_(b"r" + row["id"].to_bytes(8, "big"), dumps(row))

    return lambda: timing.each(op, rows)


def get_points(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    get, loads = r.get, cbor2.loads
    keys = random_keys(spec["seed"], spec["count"], spec["n"])

    def op(k: int) -> None:
        loads(get(b"r" + k.to_bytes(8, "big")))

    return lambda: timing.each(op, keys)


def get_many(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    mget, loads = r.mget, cbor2.loads
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    calls = [[_k(k) for k in keys[s:s + spec["batch"]]]
             for s in range(0, len(keys), spec["batch"])]

    def op(ks: list[bytes]) -> list[Any]:
        return [loads(v) for v in mget(ks)]

    return lambda: (len(keys), timing.each(op, calls)[1])


def scan_full(spec: dict[str, Any]) -> Run:
    """SCAN + MGET, 1,000 keys a step: every row once, in no particular order."""
    r = _client(spec)
    loads = cbor2.loads

    def rows() -> Any:
        cursor = 0
        while True:
            cursor, keys = r.scan(cursor, match=b"r*", count=timing.SCAN_PAGE)
            if keys:
                for k, v in zip(keys, r.mget(keys), strict=True):
                    yield int.from_bytes(k[1:], "big"), loads(v)
            if cursor == 0:
                return

    def run() -> tuple[int, list[int]]:
        n, lat = timing.pages(rows())
        if n != spec["n"]:
            raise AssertionError(f"scanned {n} rows, expected {spec['n']}")
        return n, lat

    return run


def fill_events(spec: dict[str, Any]) -> Run:
    r = _client(spec)

    def run() -> tuple[int, list[int]]:
        pipe = r.pipeline(transaction=False)
        for s in range(spec["series"]):
            key = b"v:" + series_name(s).encode()
            pipe.zadd(key, {cbor2.dumps(record(seq)): seq for seq in range(spec["per_series"])})
        pipe.execute()
        return spec["series"] * spec["per_series"], []

    return run


def scan_prefix(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    loads = cbor2.loads
    picks = [series_name(s) for s in random_keys(spec["seed"], spec["count"], spec["series"])]
    rows = 0

    def op(series: str) -> None:
        nonlocal rows
        got = r.zrange(b"v:" + series.encode(), 0, -1, withscores=True)
        out = [((series, int(score)), loads(member)) for member, score in got]
        rows += len(out)

    def run() -> tuple[int, list[int]]:
        lat = timing.each(op, picks)[1]
        return rows, lat

    return run


def fill_users(spec: dict[str, Any]) -> Run:
    r = _client(spec)

    def run() -> tuple[int, list[int]]:
        for s in range(0, spec["count"], PIPELINE):
            pipe = r.pipeline(transaction=False)
            for i in range(s, min(s + PIPELINE, spec["count"])):
                k = i.to_bytes(8, "big")
                pipe.set(b"u" + k, cbor2.dumps(record(i)))
                pipe.set(b"e:" + email(i).encode(), k, nx=True)
            pipe.execute()
        return spec["count"], []

    return run


def lookup_unique(spec: dict[str, Any]) -> Run:
    """Two GETs a lookup: the id by email, then the row."""
    r = _client(spec)
    get, loads = r.get, cbor2.loads
    emails = [email(i) for i in random_keys(spec["seed"], spec["count"], spec["users"])]

    def op(e: str) -> None:
        loads(get(b"u" + get(b"e:" + e.encode())))

    return lambda: timing.each(op, emails)


def mixed(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    get, set_, loads, dumps = r.get, r.set, cbor2.loads, cbor2.dumps
    keys = random_keys(spec["seed"], spec["count"], spec["n"])
    every = spec["write_every"]
    items = [(i % every == every - 1, k, record(k) if i % every == every - 1 else None)
             for i, k in enumerate(keys)]

    def op(item: tuple[bool, int, Any]) -> None:
        write, k, row = item
        if write:
            set_(b"r" + k.to_bytes(8, "big"), dumps(row))
        else:
            loads(get(b"r" + k.to_bytes(8, "big")))

    return lambda: timing.each(op, items)


def ts_append(spec: dict[str, Any]) -> Run:
    r = _client(spec)
    size = spec["per_append"]
    calls = [(series_name(s), c) for c in range(spec["appends"]) for s in spec["series_ids"]]

    def op(call: tuple[str, int]) -> None:
        series, c = call
        ts, vs = ts_points(c, size)
        start = int(ts[0])
        pipe = r.pipeline(transaction=False)
        pipe.set(b"t:" + series.encode() + start.to_bytes(8, "big"), ts.tobytes() + vs.tobytes())
        pipe.zadd(b"ti:" + series.encode(), {start.to_bytes(8, "big"): start})
        pipe.execute()

    return lambda: (len(calls) * size, timing.each(op, calls)[1])


def ts_range(spec: dict[str, Any]) -> Run:
    """Three round trips a query: the chunk holding the start, the chunks after it, MGET."""
    r = _client(spec)
    queries = ts_queries(spec)
    points = 0

    def op(q: tuple[str, int, int]) -> None:
        nonlocal points
        series, lo, hi = q
        sb = series.encode()
        idx = b"ti:" + sb
        first = r.zrevrangebyscore(idx, lo, "-inf", start=0, num=1)
        low = int.from_bytes(first[0], "big") if first else lo
        starts = r.zrangebyscore(idx, low, f"({hi}")
        blobs = r.mget([b"t:" + sb + s for s in starts])
        tparts, vparts = [], []
        for v in blobs:
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


# -- the server ----------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on a unix socket in ``base``; no TCP port, no persistence."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = str(base / "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        """Why the Redis baseline cannot run here, or None."""
        if shutil.which("redis-server") is None:
            return ("redis-server is not installed (apt-get install redis-server; "
                    "`make bench` does it when run as root)")
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis-py is not installed (pip install 'lmshard[bench]')"
        return None

    @staticmethod
    def version() -> str:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        for part in out.stdout.split():
            if part.startswith("v="):
                return part[2:]
        return out.stdout.strip()

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                _client({"socket": self.socket}).close()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.base / "redis.log").read_text()[-800:]
                    raise RuntimeError(f"redis-server did not start: {log_text}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def durable(self, on: bool, fsync: str = "always") -> None:
        """``appendonly yes`` + ``appendfsync always`` (every acked write fsynced; ``fsync``
        "everysec": an fsync a second, an ack once written to the OS), or off."""
        r = _client({"socket": self.socket})
        if on:
            r.config_set("appendonly", "yes")
            r.config_set("appendfsync", fsync)
            deadline = time.monotonic() + 60
            while r.info("persistence").get("aof_rewrite_in_progress") and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            r.config_set("appendonly", "no")
        r.close()

    def flush(self) -> None:
        r = _client({"socket": self.socket})
        r.flushall()
        r.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
