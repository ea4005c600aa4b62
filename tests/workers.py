"""Worker processes for the daemon tests (importable, so multiprocessing can spawn them)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import lmshard

BATCH = 10


def series_on_shard(client: lmshard.Client, shard: int, prefix: str) -> str:
    """A series name whose events (and counter) route to ``shard``."""
    ev, ctr = client.table("events"), client.table("counters")
    for i in range(100_000):
        name = f"{prefix}-{i}"
        if (ev.shard((name, 0), ev.kenc((name, 0))) == shard
                and ctr.shard(name, ctr.kenc(name)) == shard):
            return name
    raise RuntimeError("no series found")


def crash_writer(config_path: str, shard: int, worker: int, out: str, seconds: float) -> None:
    """Write batches of 10 events + 1 counter increment to one shard; log every acked batch."""
    acked = []
    try:
        with lmshard.connect(config_path, timeout_ms=300, retries=60) as c:
            series = series_on_shard(c, shard, f"w{worker}")
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline:
                with c.batch() as b:
                    for i in range(BATCH):
                        b.put("events", (series, n * BATCH + i), {"batch": n, "i": i})
                    b.incr("counters", series, 1)
                acked.append([n, b.txn_ids[shard]])
                n += 1
            retries = c.counters()["retries"]
        result = {"series": series, "acked": acked, "error": None, "retries": retries}
    except BaseException:
        result = {"series": None, "acked": acked, "error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def fleet_worker(config_path: str, worker: int, rounds: int, out: str) -> None:
    """Write own keys through batches and single puts, reading each write back at once."""
    try:
        with lmshard.connect(config_path) as c:
            base = worker * 1_000_000
            for r in range(rounds):
                with c.batch() as b:
                    for i in range(50):
                        b.put("items", base + r * 100 + i, {"group": worker, "i": i, "r": r})
                for i in range(50):  # read-your-writes: every acked write is visible locally
                    assert c.get("items", base + r * 100 + i) == {"group": worker, "i": i, "r": r}
                c.put("items", base + r * 100 + 99, {"group": worker, "single": r})
                assert c.get("items", base + r * 100 + 99) == {"group": worker, "single": r}
                c.incr("counters", f"fleet-{worker}")
                others = c.count("items")
                assert others >= (r + 1) * 51
        Path(out).write_text(json.dumps({"error": None}))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))


def growth_reader(config_path: str, seconds: float, out: str) -> None:
    """Read blobs in-process while the owners grow their maps."""
    reads = 0
    try:
        with lmshard.connect(config_path) as c:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                n = c.count("blobs")
                for k, v in c.scan("blobs", limit=20, reverse=True):
                    assert v == bytes([k % 256]) * 4096
                if n:
                    c.get_many("blobs", range(0, 50))
                reads += 1
        Path(out).write_text(json.dumps({"error": None, "reads": reads}))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc(), "reads": reads}))
