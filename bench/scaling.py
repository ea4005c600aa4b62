"""How lmshard scales: throughput by shard count and client processes; commit latency by batch.

For 1, 2 and 4 shard owners (fsync on) and 1, 2, 4 and 8 client processes: batched writes
(1,000 per batch, the same total of new rows split between the clients) and local point gets
(the same total split between the clients). Then, on one shard, how long a batch takes from
send to ack as batches grow from 1 to 10,000 rows, each its own acked commit through
``client.batch()`` (fsync included), beside raw py-lmdb committing the same batches in-process
(sync on). Medians over the rounds.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import sys_lmshard, sys_raw
from bench.procs import run_workers, split
from bench.systems import Lmshard

SHARDS = (1, 2, 4)
CLIENTS = (1, 2, 4, 8)
COMMIT_VIA = "client.batch()"
"""How the commit latency table's lmshard batches are sent (results before it used the
pipelined ``client.writer()``, whose latency is a chunk's hand-over, not an acked commit)."""


def _cells(spec: dict[str, Any], rows: int, gets: int, writes: dict[int, list[float]],
           reads: dict[int, list[float]]) -> None:
    for ci, clients in enumerate(CLIENTS):
        offset = ci * 10**8  # new keys for every cell; cell 0 writes 0 .. rows - 1
        specs = [dict(spec, start=offset + s, count=n, batch=1000) for s, n in split(rows, clients)]
        w = run_workers(sys_lmshard.insert_batched, specs)
        specs = [dict(spec, seed=100 + i, count=n, n=rows)
                 for i, (_, n) in enumerate(split(gets, clients))]
        r = run_workers(sys_lmshard.get_points, specs)
        writes.setdefault(clients, []).append(w.rate)
        reads.setdefault(clients, []).append(r.rate)
        print(f"    {spec['shards']} shard(s), {clients} client(s): batched writes "
              f"{w.rate:>10,.0f} rows/s, gets {r.rate:>10,.0f} gets/s", flush=True)


def _commits(spec: dict[str, Any], commit: Any, commits: tuple[tuple[int, int], ...],
             out: dict[int, list[np.ndarray]], rates: dict[int, list[float]]) -> None:
    """Time ``commit`` (a workload committing one batch per call) at each batch size."""
    offset = 10**9
    for batch, count in commits:
        s = run_workers(commit,
                        [dict(spec, start=offset, count=batch * count, batch=batch)])
        offset += batch * count
        out.setdefault(batch, []).append(s.latencies_ns)
        rates.setdefault(batch, []).append(s.rate)


def _latency(samples: list[np.ndarray], rates: list[float]) -> dict[str, float]:
    lat = np.concatenate(samples) / 1e6
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "rows_per_s": round(float(np.median(rates)), 1)}


def run(sizes: Any, rounds: int, tmp: Path) -> dict[str, Any]:
    rows, gets = sizes.scale_rows, sizes.scale_rows * 2
    writes: dict[int, dict[int, list[float]]] = {}
    reads: dict[int, dict[int, list[float]]] = {}
    lm_lat: dict[int, list[np.ndarray]] = {}
    lm_rate: dict[int, list[float]] = {}
    raw_lat: dict[int, list[np.ndarray]] = {}
    raw_rate: dict[int, list[float]] = {}
    for rnd in range(rounds):
        print(f"scaling, round {rnd + 1}/{rounds}", flush=True)
        order = SHARDS if rnd % 2 == 0 else SHARDS[::-1]
        for shards in order:
            system = Lmshard(shards=shards, readers=0)
            base = Path(tempfile.mkdtemp(prefix=f"scale{shards}-", dir=tmp))
            try:
                spec = dict(system.start(base), shards=shards)
                _cells(spec, rows, gets, writes.setdefault(shards, {}),
                       reads.setdefault(shards, {}))
                if shards == 1:
                    _commits(spec, sys_lmshard.commit_batches, sizes.commits, lm_lat,
                             lm_rate)
            finally:
                system.stop()
                shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix="scale-raw-", dir=tmp))
        try:
            spec = {"path": str(base / "raw")}
            sys_raw.setup(spec)
            _commits(spec, sys_raw.insert_batched, sizes.commits, raw_lat, raw_rate)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def med(d: dict[int, dict[int, list[float]]]) -> dict[str, dict[str, float]]:
        return {str(s): {str(c): round(float(np.median(v)), 1) for c, v in by.items()}
                for s, by in d.items()}

    return {
        "shards": list(SHARDS), "clients": list(CLIENTS), "rows": rows, "gets": gets,
        "writes": med(writes), "gets_per_s": med(reads),
        "commit_via": COMMIT_VIA,
        "commit": [{"batch": b, "lmshard": _latency(lm_lat[b], lm_rate[b]),
                    "raw": _latency(raw_lat[b], raw_rate[b])} for b, _ in sizes.commits],
    }
