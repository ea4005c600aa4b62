"""Replicas as monitoring shows them: a ping's ``replicas``, the owner's stats message, the
monitor's ``/metrics`` (``lmshard_shard_epoch``, ``lmshard_replica_*``) and ``lmshard top``.

A real owner and a real ``lmshardd monitor``; the replica is ``tests.replica_follower.Follower``
(REPLICATE / CREDIT / APPLIED on a real DEALER), which stands in for ``lmshardd replica`` only
because that process is being written alongside and is not in the tree yet.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lmshard import stats_board
from lmshard.changes_wire import STARTED
from lmshard.errors import ReplicaTimeout
from lmshard.ops import top
from tests.cluster import Cluster, wait_for
from tests.replica_follower import Follower
from tests.test_replication_acks import Writer

INTERVAL = 0.2
TIMEOUT = 3.0
"""durability.replica_timeout: long enough to see an ack held, short enough to see it fail."""


def _metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: name -> sorted labels -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    return out


def _render(snap: dict[str, Any], width: int) -> list[str]:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, force_terminal=True, record=True)
    console.print(top.render_top(snap))
    return console.export_text().splitlines()


def _headers(lines: list[str]) -> list[str]:
    row = next(line for line in lines if line.startswith("shard "))
    return re.split(r" {2,}", row.strip())


def test_replica_lag_and_held_acks_in_ping_stats_metrics_and_top(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, shards=1, replica_names=["b"], replicas_required=1,
                 replica_timeout=TIMEOUT, stats_interval=INTERVAL)
    monitor = None
    with cl:
        f, w = Follower(cl.config), Writer(cl)
        try:
            with open(tmp_path / "monitor.log", "wb") as out:
                monitor = subprocess.Popen(
                    [sys.executable, "-m", "lmshardd.main", "-c", str(cl.config_path),
                     "monitor", "--http", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
            assert f.replicate().message is STARTED
            w.put(1, 1, b"one")
            f.until("the first write", lambda: f.changes)
            (first,) = f.changes
            f.applied(first)
            reply = w.reply(5.0)
            assert reply is not None and reply[1] == 0

            w.put(2, 2, b"two")  # held: the replica never applies it
            f.until("the second write", lambda: len(f.changes) == 2)
            second = max(f.changes)
            time.sleep(0.5)
            with cl.client() as c:
                b = c.ping(0)["replicas"]["b"]
            assert b["applied"] == first and b["lag_txns"] >= second - first
            assert 0.4 <= b["lag_seconds"] < TIMEOUT + 5
            assert abs(b["last_heard"] - time.time()) < 5

            def held_in_stats() -> dict[str, Any] | None:
                snap = stats_board.query_monitor(cl.config)
                entry = snap and snap["shards"][0]
                rep = entry and entry.get("stats") and entry["stats"]["replication"]
                return snap if rep and rep["held"] == 1 else None

            snap = wait_for("the monitor to show the held ack", held_in_stats)
            url = snap["monitor"]["http"]
            m = _metrics(url)
            shard_b = (("replica", "b"), ("shard", "0"))
            assert m["lmshard_shard_epoch"][(("shard", "0"),)] == 1
            assert m["lmshard_replica_applied_txn"][shard_b] == first
            assert m["lmshard_replica_lag_txns"][shard_b] >= second - first
            assert m["lmshard_replica_lag_seconds"][shard_b] > 0
            assert m["lmshard_replica_acks_held"][(("shard", "0"),)] == 1
            assert m["lmshard_replica_timeouts_total"][(("shard", "0"),)] == 0

            narrow = _render(snap, 80)
            assert max(len(line.rstrip()) for line in narrow) <= 80
            headers = _headers(narrow)
            assert headers[:3] == ["shard", "state", "replica lag"], narrow
            assert {"writes/s", "commit ms p50/p99/max", "map %max"} <= set(headers)
            row = next(line for line in narrow if line.startswith("0 "))
            assert re.search(rf"\b{second - first} \d+\.\ds\b", row), row
            assert "batches/s" in _headers(_render(snap, 200))

            timed_out = w.reply(TIMEOUT + 5)
            assert timed_out is not None and timed_out[1] == ReplicaTimeout.code
            wait_for("the timeout in /metrics", lambda: _metrics(url)[
                "lmshard_replica_timeouts_total"][(("shard", "0"),)] == 1)
            assert _metrics(url)["lmshard_replica_acks_held"][(("shard", "0"),)] == 0
        finally:
            f.close()
            w.close()
            if monitor is not None:
                monitor.kill()
                monitor.wait()


def test_top_and_metrics_without_replicas_are_as_before(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=1, stats_interval=INTERVAL) as cl:
        snap = stats_board.collect(cl.config).snapshot()
    s = snap["shards"][0]["stats"]
    assert s["replication"] is None and s["epoch"] == 1
    headers = _headers(_render(snap, 200))
    assert "replica lag" not in headers and "batches/s" in headers
    assert "replica lag" not in _headers(_render(snap, 80))
