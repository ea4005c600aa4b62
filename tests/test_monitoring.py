"""Shard stats: the message, the owner's channel, the monitor (Prometheus and JSON), stats/top.

The process tests run real shard owners (tests.cluster.Cluster) publishing every 0.2 s and a
real ``lmshardd monitor``; they wait for conditions, never for fixed times.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmshard import stats_board, stats_wire
from lmshard.ops import stats_table, top
from lmshardd import monitor, stats
from tests.cluster import WAIT, Cluster, wait_for

INTERVAL = 0.2
"""Stats interval of the test owners: stale after 0.6 s."""



def body(shard: int = 0, **fields: Any) -> dict[str, Any]:
    """A well-formed stats message body, as an owner would publish it."""
    b: dict[str, Any] = {
        "v": 1, "shard": shard, "pid": 100 + shard, "seq": 0, "time": time.time(),
        "started": time.time() - 5, "uptime": 5.0, "interval": 1.0, "window": 1.0,
        "ops": 1000, "batches": 10, "failed_batches": 1, "duplicate_batches": 0, "commits": 8,
        "reads": 3, "bad_frames": 0,
        "rates": {"writes": 1000.0, "batches": 10.0, "failed": 1.0, "commits": 8.0},
        "commit_seconds": {"p50": 0.001, "p99": 0.004, "max": 0.005, "sum": 0.02},
        "group_size": {"p50": 1.0, "p99": 2.0, "max": 2},
        "ops_per_batch": {"p50": 100.0, "p99": 100.0, "max": 100.0},
        "queue_depth": 1, "queue_depth_max": 2, "map_size": 1 << 26, "map_used": 1 << 20,
        "max_map_size": 1 << 30, "page_size": 4096, "readers_used": 2, "readers_active": 1,
        "max_readers": 126, "tables": {"blobs": 1000, "users": 0}, "last_txn_id": 9,
        "last_commit_time": time.time(), "changes": None, "dropped": 0,
        "publish_seconds": 0.0001,
    }
    b.update(fields)
    return b


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Any]:
    """A 3-shard config; nothing runs (its run directory is removed afterwards)."""
    cl = Cluster(tmp_path, shards=3, stats_interval=INTERVAL)
    try:
        yield cl.config
    finally:
        shutil.rmtree(cl.run_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The message and the board
# --------------------------------------------------------------------------------------------


def test_decode_takes_good_messages_and_refuses_bad_ones() -> None:
    frames = stats_wire.encode(2, body(2))
    assert frames[0] == b"stat.2"
    assert stats_wire.decode(frames, 2)["ops"] == 1000
    bad = {
        "one frame": [frames[1]],
        "other topic": [b"stats.2", frames[1]],
        "topic not a number": [b"stat.x", frames[1]],
        "another shard's endpoint": frames,  # decoded as if it came from shard 1
        "not msgpack": [b"stat.2", b"\xc1\xc1"],
        "not a map": [b"stat.2", msgpack.packb([1, 2])],
        "future version": stats_wire.encode(2, body(2, v=2)),
        "body names another shard": [b"stat.2", msgpack.packb(body(3))],
        "negative counter": stats_wire.encode(2, body(2, ops=-1)),
        "missing quantiles": stats_wire.encode(2, body(2, commit_seconds=None)),
        "a rate that is text": stats_wire.encode(2, body(2, rates={"writes": "fast"})),
        "a row count that is negative": stats_wire.encode(2, body(2, tables={"blobs": -1})),
        "no uptime": stats_wire.encode(2, body(2, uptime=None)),
    }
    for why, frames_ in bad.items():
        with pytest.raises(ValueError):
            stats_wire.decode(frames_, 1 if why == "another shard's endpoint" else 2)
    # A newer owner may add fields: they are kept, not refused.
    newer = msgpack.packb(body(2) | {"future": 1})
    assert stats_wire.decode([b"stat.2", newer], 2)["future"] == 1


def test_bodies_are_packed_through_their_declaration() -> None:
    b = body(2)
    declared = [f.name for f in stats_wire.STAT.fields]
    assert list(msgpack.unpackb(stats_wire.encode(2, dict(reversed(b.items())))[1])) == declared
    for bad in ({k: v for k, v in b.items() if k != "uptime"}, b | {"extra": 1}):
        with pytest.raises(ValueError):
            stats_wire.encode(2, bad)
    snap = {"time": 1.0, "config": None, "shards_total": 1, "shards_up": 1, "interval": 1.0,
            "stale_after": 3.0, "bad_messages": 0, "monitor": {"pid": 1},
            "shards": [{"shard": 0, "up": True, "stats": b}]}
    assert stats_wire.decode_snapshot(stats_wire.encode_snapshot(snap)) == snap
    for broken in (snap | {"shards": {}}, snap | {"shards_up": -1}, [snap]):
        with pytest.raises(ValueError):
            stats_wire.decode_snapshot(msgpack.packb(broken))
    assert stats_wire.is_monitor_request([b"peer", *stats_wire.monitor_request()])
    assert not stats_wire.is_monitor_request([b"peer", b"", b"stat"])


def test_board_shows_a_silent_shard_as_stale_with_its_age_growing(config: Any) -> None:
    now = [100.0]
    board = stats_board.StatsBoard(config, clock=lambda: now[0])
    assert board.stale_after == pytest.approx(3 * INTERVAL)
    board.update(0, body(0))
    board.update(1, body(1))
    now[0] += 0.1
    snap = board.snapshot()
    assert [s["up"] for s in snap["shards"]] == [True, True, False]
    assert snap["shards"][2]["seen"] is False and snap["shards"][2]["stats"] is None
    board.update(0, body(0, seq=1))
    now[0] += 0.55  # shard 1 last reported 0.65 s ago: past stale_after
    snap = board.snapshot()
    assert [s["up"] for s in snap["shards"]] == [True, False, False]
    age = snap["shards"][1]["age"]
    now[0] += 1.0
    assert board.snapshot()["shards"][1]["age"] == pytest.approx(age + 1.0)
    assert snap["shards_up"] == 1
    board.update(0, body(0, pid=999, seq=0))  # the owner restarted
    assert board.shards[0].restarts == 1 and len(board.shards[0].history) == 3
    json.dumps(board.snapshot())  # the /stats document is plain data


def test_quantiles_nearest_rank_and_weighted() -> None:
    values = [float(i) for i in range(1, 101)]
    q = stats.quantiles(values)
    assert q == {"p50": 51.0, "p99": 100.0, "max": 100.0}
    assert stats.quantiles([]) == {"p50": None, "p99": None, "max": None}
    # 99 batches of 10 ops committed as one group, 1 batch of 1000 ops alone.
    w = stats.weighted_quantiles([(10.0, 99), (1000.0, 1)])
    assert w == {"p50": 10.0, "p99": 1000.0, "max": 1000.0}


# --------------------------------------------------------------------------------------------
# Prometheus and the views, from a made-up snapshot
# --------------------------------------------------------------------------------------------


def snapshot_with_a_stale_shard(config: Any) -> dict[str, Any]:
    now = [0.0]
    board = stats_board.StatsBoard(config, clock=lambda: now[0])
    board.update(0, body(0))
    board.update(1, body(1, map_used=900 << 20, readers_used=110))  # 88% of 1 GiB, 87% of slots
    board.update(2, body(2))
    now[0] = 1.0
    board.update(0, body(0, seq=1))
    board.update(1, body(1, seq=1, map_used=900 << 20, readers_used=110))
    snap = board.snapshot()
    assert not snap["shards"][2]["up"]
    return snap


def test_metrics_follow_prometheus_conventions_and_leave_stale_shards_out(config: Any) -> None:
    snap = snapshot_with_a_stale_shard(config)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor.SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["lmshard_writes"].type == "counter"
    assert families["lmshard_commit_latency_seconds"].type == "summary"
    assert families["lmshard_map_used_bytes"].type == "gauge"
    up = {s.labels["shard"]: s.value for s in families["lmshard_shard_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    writes = {s.labels["shard"]: s.value for s in families["lmshard_writes"].samples}
    assert writes == {"0": 1000.0, "1": 1000.0}  # shard 2 is stale: no sample, not 0
    p99 = [s for s in families["lmshard_commit_latency_seconds"].samples
           if s.labels.get("quantile") == "0.99" and s.labels["shard"] == "0"]
    assert p99[0].value == 0.004
    rows = {(s.labels["shard"], s.labels["table"]): s.value
            for s in families["lmshard_table_rows"].samples}
    assert rows[("0", "blobs")] == 1000.0
    assert families["lmshard_stats_age_seconds"].samples[2].value == 1.0
    for name in families:
        assert name.startswith("lmshard_")


def change_log(**fields: Any) -> dict[str, Any]:
    """A stats message's ``changes`` map, as an owner's ChangesChannel.stats() gives it."""
    log: dict[str, Any] = {
        "history": "0123456789abcdef", "bytes": 12288, "records": 40, "oldest_txn": 7,
        "newest_txn": 46, "floor": 7, "retain": 64 << 20, "retain_seconds": 86400.0,
        "watchers": [{"watch": 1, "lag_txns": 0, "lag_seconds": 0.0, "credit": 64,
                      "messages": 3},
                     {"watch": 2, "lag_txns": 25, "lag_seconds": 4.5, "credit": 0,
                      "messages": 64}],
        "sent_changes": 67, "bad_frames": 0,
    }
    log.update(fields)
    return log


def test_metrics_show_each_shards_change_log_and_its_furthest_behind_watch(
        config: Any) -> None:
    now = [100.0]
    board = stats_board.StatsBoard(config, clock=lambda: now[0])
    board.update(0, body(0, changes=change_log()))
    board.update(1, body(1, changes=change_log(oldest_txn=None, newest_txn=None, records=0,
                                               watchers=[])))
    board.update(2, body(2))  # the log is off
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor.SnapshotCollector(board.snapshot))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}

    def per_shard(name: str) -> dict[str, float]:
        return {s.labels["shard"]: s.value for s in families[name].samples}

    assert per_shard("lmshard_changes_bytes") == {"0": 12288.0, "1": 12288.0}
    assert per_shard("lmshard_changes_oldest_txn") == {"0": 7.0}  # none for an empty log
    assert per_shard("lmshard_changes_watchers") == {"0": 2.0, "1": 0.0}
    assert per_shard("lmshard_changes_max_lag_txns") == {"0": 25.0, "1": 0.0}
    assert per_shard("lmshard_changes_max_lag_seconds") == {"0": 4.5, "1": 0.0}
    assert per_shard("lmshard_changes_sent") == {"0": 67.0, "1": 67.0}
    assert families["lmshard_changes_sent"].type == "counter"
    frames = stats_wire.encode(0, body(0, changes=change_log()))
    assert stats_wire.decode(frames)["changes"]["watchers"][1]["lag_txns"] == 25
    with pytest.raises(ValueError):
        stats_wire.decode(stats_wire.encode(0, body(0, changes=[1])))
    older = body(0, changes=None)  # an owner from before the change log sends no such field
    del older["changes"]
    frames = [stats_wire.topic(0), msgpack.packb(older, use_bin_type=True)]
    assert stats_wire.decode(frames)["changes"] is None


def test_status_line_mentions_the_change_log() -> None:
    from lmshard.ops import status

    health = {"last_commit_age": 1.0, "rtt_ms": 0.4, "txn_id": 46, "map_used_pct": 1.0,
              "map_size": 1 << 26, "max_map_used_pct": 0.1, "max_map_size": 1 << 30,
              "readers": 1, "max_readers": 126,
              "changes": stats_wire.changes_summary(change_log())}
    line = status._health_text({"health": health})
    assert line.endswith("changes 12.0 KiB from txn 7, 2 watches, 4.5s behind"), line
    health["changes"] = None  # the log is off
    assert "changes" not in status._health_text({"health": health})


def test_top_frame_shows_every_shard_and_warns_about_limits(config: Any) -> None:
    from rich.console import Console

    snap = snapshot_with_a_stale_shard(config)
    rows = [stats_table.shard_row(e) for e in snap["shards"]]
    assert rows[0]["map_level"] == 0 and rows[1]["map_level"] == 1
    assert rows[1]["readers_level"] == 1  # 110/126 = 87%: warn, not yet alert (95%)
    assert rows[2]["cells"]["writes/s"] == "-"  # the stale shard's rate is not shown as 0
    assert rows[2]["cells"]["acked"] == "10"  # its last known counters are
    console = Console(file=io.StringIO(), width=200, force_terminal=True, record=True)
    console.print(top.render_top(snap))
    text = console.export_text(clear=False)
    lines = [line.split() for line in text.splitlines()]
    assert {ln[0] for ln in lines if ln and ln[0] in ("0", "1", "2")} >= {"0", "1", "2"}
    assert "STALE" in text and "shards 1: map or reader slots above 80%" in text
    styled = console.export_text(styles=True)
    assert "\x1b[1;33m" in styled  # bold yellow, the warning colour
    plain = stats_table.render_text(snap)
    assert "STALE" in plain and "rows per table" in plain


def render_at(snap: dict[str, Any], width: int) -> list[str]:
    """``top``'s frame as a terminal ``width`` cells wide shows it (no styles)."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, force_terminal=True, record=True)
    console.print(top.render_top(snap))
    return console.export_text().splitlines()


def header_cells(lines: list[str]) -> list[str]:
    """The shard table's headers (they are separated by 2 or more spaces, words by one)."""
    row = next(line for line in lines if line.startswith("shard "))
    return re.split(r" {2,}", row.strip())


def test_top_columns_are_declared_once_with_distinct_priorities() -> None:
    headers = [c.header for c in top.TOP_COLUMNS]
    assert headers[:-1] == list(stats_table.COLUMNS) and headers[-1] == "writes/s trend"
    assert sorted(c.priority for c in top.TOP_COLUMNS) == list(range(len(headers)))
    assert all(c.width >= 1 for c in top.TOP_COLUMNS)
    # widths 5, 3, 4 in display order, priorities 0, 2, 1: the third goes before the second.
    assert top.fit_columns([5, 3, 4], [0, 2, 1], 16) == [0, 1, 2]
    assert top.fit_columns([5, 3, 4], [0, 2, 1], 15) == [0, 2]
    assert top.fit_columns([5, 3, 4], [0, 2, 1], 10) == [0]
    assert top.fit_columns([5, 3, 4], [0, 2, 1], 2) == [0]  # ``keep`` stays
    assert top.fit_columns([5, 3, 4], [0, 2, 1], 2, keep=2) == [0, 2]


@pytest.mark.parametrize("width", [200, 160, 120, 100, 80, 72, 60, 40])
def test_top_drops_whole_columns_by_priority_and_never_cuts_a_header(
        config: Any, width: int) -> None:
    snap = snapshot_with_a_stale_shard(config)
    lines = render_at(snap, width)
    assert max(len(line.rstrip()) for line in lines) <= width
    assert not any("…" in line for line in lines), "\n".join(lines)
    headers = header_cells(lines)
    by_header = {c.header: c for c in top.TOP_COLUMNS}
    assert set(headers) <= set(by_header), headers  # whole headers only
    assert headers == [c.header for c in top.TOP_COLUMNS if c.header in headers]
    # What is shown is the most important columns: no column is missing while a less
    # important one shows.
    shown = sorted(by_header[h].priority for h in headers)
    assert shown == list(range(len(shown)))
    assert headers[:2] == ["shard", "state"]
    first = next(i for i, line in enumerate(lines) if line.startswith("shard "))
    states = {line.split()[0]: line.split()[1] for line in lines[first + 1:first + 4]}
    assert states == {"0": "up", "1": "up", "2": "STALE"}, "\n".join(lines)
    if width >= 80:
        assert {"writes/s", "batches/s", "commit ms p50/p99/max", "map %max"} <= set(headers)
    if width >= 200:
        assert headers == [c.header for c in top.TOP_COLUMNS]
    if width < 200:
        assert len(headers) < len(top.TOP_COLUMNS)


def test_top_rows_table_shows_the_tables_that_fit(config: Any) -> None:
    names = {f"table_number_{i:02d}": i * 1000 for i in range(12)}
    now = [0.0]
    board = stats_board.StatsBoard(config, clock=lambda: now[0])
    for shard in range(3):
        board.update(shard, body(shard, tables=names))
    snap = board.snapshot()
    narrow = render_at(snap, 80)
    assert max(len(line.rstrip()) for line in narrow) <= 80
    assert not any("…" in line for line in narrow)
    assert "table_number_00" in "\n".join(narrow) and "table_number_11" not in "\n".join(narrow)
    assert any("more tables not shown at this width" in line for line in narrow)
    wide = "\n".join(render_at(snap, 400))
    assert "table_number_11" in wide and "not shown" not in wide


def test_docs_list_every_metric_and_message_field(config: Any) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "monitoring.md").read_text()
    for family in monitor.metric_families(snapshot_with_a_stale_shard(config)):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{name}` | {family.type} |" in doc, name
    stats_row = next(line for line in doc.splitlines() if line.startswith("| `/stats` |"))
    for f in stats_wire.SNAPSHOT.fields:
        assert f"`{f.name}`" in stats_row, f.name
    assert stats_wire.fields_markdown(stats_wire.STAT) in doc, (
        "docs/monitoring.md's field table is stale: python -m lmshard.stats_wire prints it")


# --------------------------------------------------------------------------------------------
# The owner's channel, in this process
# --------------------------------------------------------------------------------------------


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Any]:
    from lmshardd.owner import ShardOwner

    cl = Cluster(tmp_path, shards=1, stats_interval=INTERVAL)
    o = ShardOwner(cl.config, 0)
    try:
        yield o
    finally:
        o.close()
        shutil.rmtree(cl.run_dir, ignore_errors=True)


def test_channel_window_quantiles_sampling_and_no_blocking(owner: Any) -> None:
    ch = stats.make_channel(owner)
    assert ch is not None
    owner.add_channel(ch)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.RCVHWM, 2)
        sub.subscribe(b"stat.0")
        sub.connect(owner.config.stat_endpoint(0))
        deadline = time.monotonic() + WAIT
        while not sub.poll(50):  # the slow joiner: publish until the subscription is in
            assert time.monotonic() < deadline
            ch.publish(time.monotonic())
        while sub.poll(0):
            sub.recv_multipart()
        for i in range(1, 101):
            ch.after_commit(batches=1 + i % 2, ops=10 * (1 + i % 2), seconds=i / 1000)
        ch.after_commit(batches=5, ops=50, seconds=0.0005)
        ch.publish(time.monotonic())
        assert sub.poll(int(WAIT * 1000))
        frames = sub.recv_multipart()
        msg = stats_wire.decode(frames, 0)
        # Packed in the declared order (the order the owner always sent them in).
        assert list(msgpack.unpackb(frames[1])) == [f.name for f in stats_wire.STAT.fields]
        assert msg["commit_seconds"]["p50"] == pytest.approx(0.050)
        assert msg["commit_seconds"]["max"] == pytest.approx(0.100)
        assert msg["group_size"]["max"] == 5 and msg["queue_depth"] == 0  # no real commit
        assert msg["ops_per_batch"]["p50"] == 10.0 and msg["ops_per_batch"]["max"] == 10.0
        assert msg["tables"]["blobs"] == 0 and msg["readers_used"] >= 0
        assert msg["map_used"] > 0 and msg["max_map_size"] == owner.config.max_map_size

        # Many commits in one window: the sample thins itself out and stays representative.
        for i in range(stats.MAX_SAMPLES * 5):
            ch.after_commit(batches=1, ops=1, seconds=(i % 100 + 1) / 1000)
        assert len(ch._samples) < stats.MAX_SAMPLES
        # A subscriber that never reads: publishing goes on and never waits for it.
        for _ in range(3000):
            ch.publish(time.monotonic())
        assert sub.poll(int(WAIT * 1000))
        first = stats_wire.decode(sub.recv_multipart(), 0)
        assert first["commit_seconds"]["p50"] == pytest.approx(0.050, abs=0.005)
        assert first["commit_seconds"]["max"] == pytest.approx(0.100)
        received = 1
        while sub.poll(200):
            sub.recv_multipart()
            received += 1
        assert received < 3000  # dropped at the high-water marks, never waited for
    finally:
        sub.close(linger=0)
        ctx.term()


def test_stats_can_be_switched_off(owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stats_wire.ENV_SWITCH, "0")
    assert stats.make_channel(owner) is None
    monkeypatch.setenv(stats_wire.ENV_SWITCH, "1")
    ch = stats.make_channel(owner)
    assert ch is not None
    ch.close()


# --------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------


class RecordingBoard(stats_board.StatsBoard):
    """A board that also keeps every message it was given."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.all: list[list[dict[str, Any]]] = [[] for _ in range(config.shards)]

    def update(self, shard: int, body: dict[str, Any], now: float | None = None) -> None:
        super().update(shard, body, now)
        self.all[shard].append(body)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, stats_interval=INTERVAL)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_published_counters_equal_the_writes(cluster: Cluster) -> None:
    n, per_batch = 10_000, 250
    board = RecordingBoard(cluster.config)
    with stats_board.StatsSubscriber(cluster.config) as sub:
        sub.follow(board, WAIT, until_all=True)
        assert board.seen_all()
        before = [b.last for b in board.shards]
        with cluster.client() as c:
            for start in range(0, n, per_batch):
                with c.batch() as b:
                    for i in range(start, start + per_batch):
                        b.put("blobs", i, b"v%d" % i)
            sent = c.stats()["client"]

        def all_counted() -> bool:
            sub.poll(board, 100)
            return sum(s.last["ops"] for s in board.shards if s.last) == n

        wait_for("the published ops to reach the writes", all_counted)
        sub.follow(board, INTERVAL * 1.5)  # one more message each: nothing more is counted
    lasts = [s.last for s in board.shards]
    assert all(m is not None for m in lasts)
    assert sum(m["ops"] for m in lasts) == n == sent["ops_sent"]
    assert sum(m["batches"] for m in lasts) == sent["batches_sent"]
    assert sum(m["failed_batches"] + m["duplicate_batches"] for m in lasts) == 0
    assert sum(m["tables"]["blobs"] for m in lasts) == n
    for shard, (first, last) in enumerate(zip(before, lasts, strict=True)):
        assert last["tables"]["blobs"] == last["ops"]  # one row per op, on its own shard
        assert last["last_txn_id"] >= last["commits"] > 0
        assert last["uptime"] > first["uptime"] and last["pid"] == cluster.pid(shard)
        assert 0 < last["map_used"] <= last["map_size"] <= last["max_map_size"]
        assert 1 <= last["readers_used"] <= last["max_readers"]
        msgs = [m for m in board.all[shard] if m["seq"] > first["seq"]]
        assert [m["seq"] for m in msgs] == list(range(first["seq"] + 1, last["seq"] + 1))
        # The rates, summed over the windows, give back the counters.
        assert sum(m["rates"]["writes"] * m["window"] for m in msgs) == pytest.approx(
            last["ops"] - first["ops"])
        busy = [m for m in msgs if m["rates"]["batches"] > 0]
        assert busy and all(m["commit_seconds"]["p50"] is not None for m in busy)
        assert max(m["ops_per_batch"]["max"] for m in busy) <= per_batch
        assert max(m["queue_depth_max"] for m in msgs) >= 1


def test_owners_publish_their_change_log_and_how_far_a_watch_is_behind(
        cluster: Cluster) -> None:
    board = stats_board.StatsBoard(cluster.config)
    with stats_board.StatsSubscriber(cluster.config) as sub, cluster.client() as c:
        watch = c.watch("counters")
        shard = c.tables["counters"].route.shard("k", b"k")
        for i in range(100):  # one transaction each: more than the watch's credit
            c.put("counters", "k", i)

        def published(check: Any) -> dict[str, Any] | None:
            sub.poll(board, 100)
            last = board.shards[shard].last
            log = last and last["changes"]
            return log if log and check(log) else None

        log = wait_for("a lagging watch to be published", lambda: published(
            lambda log: log["watchers"] and log["watchers"][0]["lag_txns"] > 0))
        assert log["bytes"] > 0 and log["oldest_txn"] <= log["newest_txn"]
        assert log["newest_txn"] == board.shards[shard].last["last_txn_id"]
        assert log["watchers"][0]["lag_seconds"] >= 0
        ping = c.ping(shard)["changes"]
        assert ping["watchers"] == 1 and ping["max_lag_txns"] > 0
        assert ping["bytes"] > 0 and ping["oldest_txn"] is not None
        seen = 0
        while seen < 100:  # read it all: the watch catches up
            assert watch.get(WAIT) is not None
            seen += 1
        wait_for("the watch to be caught up", lambda: published(
            lambda log: log["watchers"] and log["watchers"][0]["lag_txns"] == 0))
        watch.close()
        wait_for("the closed watch to be gone", lambda: published(
            lambda log: not log["watchers"]))


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode(), r.headers["Content-Type"]


def metric_samples(url: str, name: str) -> dict[str, float]:
    text, _ = get(url + "/metrics")
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["shard"]: s.value for s in family.samples
                    if s.name in (name, name + "_total")}
    return {}


@pytest.fixture
def monitor_proc(cluster: Cluster) -> Iterator[subprocess.Popen[bytes]]:
    log = cluster.base / "monitor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmshardd.main", "-c", str(cluster.config_path), "monitor",
             "--http", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_monitor_metrics_stats_and_a_killed_shard(
    cluster: Cluster, monitor_proc: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(cluster.config_path)

    def all_up() -> dict[str, Any] | None:
        assert monitor_proc.poll() is None, (cluster.base / "monitor.log").read_text()
        snap = stats_board.query_monitor(cluster.config)
        return snap if snap and snap["shards_up"] == 4 else None

    url = wait_for("the monitor to see every shard", all_up)["monitor"]["http"]
    assert url.startswith("http://127.0.0.1:")
    with cluster.client() as c, c.batch() as b:
        for i in range(2000):
            b.put("blobs", i, b"x")
    wait_for("/metrics to count the writes",
             lambda: sum(metric_samples(url, "lmshard_writes").values()) == 2000)

    text, ctype = get(url + "/metrics")
    assert ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("lmshard_shard_up", "lmshard_stats_age_seconds", "lmshard_writes",
                 "lmshard_batches", "lmshard_failed_batches", "lmshard_commit_latency_seconds",
                 "lmshard_map_used_bytes", "lmshard_map_max_bytes", "lmshard_reader_slots_used",
                 "lmshard_table_rows", "lmshard_queue_depth", "lmshard_last_txn_id",
                 "lmshard_changes_bytes", "lmshard_changes_oldest_txn",
                 "lmshard_changes_watchers", "lmshard_changes_max_lag_seconds"):
        assert name in families, name
    doc = json.loads(get(url + "/stats")[0])
    assert [s["shard"] for s in doc["shards"]] == [0, 1, 2, 3]
    assert sum(s["stats"]["tables"]["blobs"] for s in doc["shards"]) == 2000

    cluster.kill(1)
    wait_for("shard 1 to go stale",
             lambda: metric_samples(url, "lmshard_shard_up").get("1") == 0.0)
    age1 = metric_samples(url, "lmshard_stats_age_seconds")["1"]
    wait_for("shard 1's age to grow",
             lambda: metric_samples(url, "lmshard_stats_age_seconds")["1"] > age1 + INTERVAL)
    writes = metric_samples(url, "lmshard_writes")
    assert set(writes) == {"0", "2", "3"}  # no zero for the dead shard: no sample at all
    assert metric_samples(url, "lmshard_shard_up") == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0}

    # lmshard stats asks the monitor; exit status 1 because a shard is stale.
    capsys.readouterr()
    assert top.main(["stats", "--json", "-c", cfg]) == top.EXIT_STALE
    snap = json.loads(capsys.readouterr().out)
    assert snap["source"] == "monitor"
    assert [s["up"] for s in snap["shards"]] == [True, False, True, True]
    assert top.main(["stats", "-c", cfg]) == top.EXIT_STALE
    table = capsys.readouterr().out
    assert "3/4 shards up" in table and "STALE" in table

    # lmshard top --once, as a process: every shard, the dead one marked.
    out = subprocess.run([sys.executable, "-m", "lmshard.ops.top", "top", "--once", "-c", cfg],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first_cells = [line.split()[:2] for line in out.stdout.splitlines() if line.strip()]
    states = {cells[0]: cells[1] for cells in first_cells if len(cells) == 2
              and cells[0] in ("0", "1", "2", "3") and cells[1] in ("up", "NO", "STALE")}
    assert states == {"0": "up", "1": "NO", "2": "up", "3": "up"}, out.stdout

    # The shard comes back: up again, counting from 0 (a new process), its rows still there.
    cluster.start(1)
    wait_for("shard 1 to be up again",
             lambda: metric_samples(url, "lmshard_shard_up").get("1") == 1.0)
    assert metric_samples(url, "lmshard_writes")["1"] == 0.0
    text, _ = get(url + "/metrics")
    rows = {(s.labels["shard"], s.labels["table"]): s.value
            for f in text_string_to_metric_families(text) if f.name == "lmshard_table_rows"
            for s in f.samples}
    assert rows[("1", "blobs")] == doc["shards"][1]["stats"]["tables"]["blobs"]

    # Without the monitor, lmshard stats subscribes to the shards itself.
    monitor_proc.send_signal(signal.SIGTERM)
    assert monitor_proc.wait(timeout=30) == 0
    assert not Path(cluster.config.monitor_endpoint[len("ipc://"):]).exists()
    assert top.main(["stats", "--json", "-c", cfg]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["source"] == "direct" and snap["shards_up"] == 4
    assert sum(s["stats"]["ops"] for s in snap["shards"]) == sum(writes.values())
