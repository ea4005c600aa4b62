"""Several processes, map growth and SIGKILLed owners: what is on disk afterwards."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

import lmshard
from tests import workers
from tests.cluster import Cluster

pytestmark = pytest.mark.slow


def _run(ctx, target, args_list):  # type: ignore[no-untyped-def]
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    return procs


def test_four_worker_processes_write_and_read_concurrently(
    cluster: Cluster, tmp_path: Path
) -> None:
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"w{i}.json" for i in range(4)]
    procs = _run(ctx, workers.fleet_worker,
                 [(str(cluster.config_path), i, 20, str(outs[i])) for i in range(4)])
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for out in outs:
        assert json.loads(out.read_text())["error"] is None
    with cluster.client() as c:
        assert c.count("items") == 4 * 20 * 51
        for w in range(4):
            assert c.get("counters", f"fleet-{w}") == 20
            assert len(c.lookup("items", "by_group", w)) == 20 * 51


def test_map_grows_under_load_while_other_processes_read(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, shards=2, map_size="256KiB", max_map_size="1GiB")
    cl.start()
    try:
        ctx = mp.get_context("spawn")
        outs = [tmp_path / f"r{i}.json" for i in range(3)]
        procs = _run(ctx, workers.growth_reader,
                     [(str(cl.config_path), 6.0, str(o)) for o in outs])
        with cl.client() as c:
            before = [c.ping(s)["map_size"] for s in range(2)]
            for start in range(0, 3000, 100):
                with c.batch() as b:
                    for k in range(start, start + 100):
                        b.put("blobs", k, bytes([k % 256]) * 4096)
            after = [c.ping(s)["map_size"] for s in range(2)]
            assert c.count("blobs") == 3000
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        results = [json.loads(o.read_text()) for o in outs]
        assert all(r["error"] is None for r in results), results
        assert all(r["reads"] > 0 for r in results)
        assert all(a >= 16 * b for a, b in zip(after, before, strict=True))
    finally:
        cl.stop()


def test_sigkilled_owner_loses_no_acked_write_and_applies_nothing_twice(
    cluster: Cluster, tmp_path: Path
) -> None:
    victim = 1
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"c{i}.json" for i in range(3)]
    procs = _run(ctx, workers.crash_writer,
                 [(str(cluster.config_path), victim, i, str(outs[i]), 8.0) for i in range(3)])
    time.sleep(1.5)
    for _ in range(3):
        cluster.kill(victim)  # SIGKILL mid-write
        time.sleep(0.3)
        cluster.start(victim)
        time.sleep(1.0)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    assert sum(r["retries"] for r in results) >= 3  # the writers did live through the kills
    with cluster.client() as c:
        for r in results:
            series, acked = r["series"], [n for n, _ in r["acked"]]
            assert len(acked) > 10
            rows = list(c.scan("events", prefix=(series,)))
            by_batch: dict[int, int] = {}
            for (_, _), v in rows:
                by_batch[v["batch"]] = by_batch.get(v["batch"], 0) + 1
            assert all(n == workers.BATCH for n in by_batch.values())  # no half batch
            assert set(acked) <= set(by_batch)  # every acked batch is on disk
            # the counter was incremented in the same batches: once per applied batch
            assert c.get("counters", series) == len(by_batch)
            assert len(by_batch) <= len(acked) + 1  # at most the one in flight at the end


def test_owner_stops_cleanly_on_sigterm(cluster: Cluster) -> None:
    import signal

    with cluster.client() as c:
        c.put("blobs", 1, b"x")
    for s in range(4):
        cluster.kill(s, signal.SIGTERM)
        assert cluster.procs[s].returncode == 0
    with lmshard.open(cluster.config.shard_dir(0), cluster.config.load_schema(), readonly=True):
        pass
