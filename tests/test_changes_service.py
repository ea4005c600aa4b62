"""The change feed of real shard owners: ``client.watch()`` under load, owner and watcher
crashes, retention under sustained writes, filters, and restarts."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard.changes import format_cursor, parse_cursor
from lmshard.errors import ChangesCompacted
from lmshard.watch import Change, Watch
from tests import change_workers
from tests.change_workers import norm
from tests.cluster import Cluster, wait_for

WRITERS = 4
WATCHERS = 2
WRITE_SECONDS = 10.0


def drain(w: Watch, timeout: float = 0.5) -> list[Change]:
    out = []
    while (c := w.get(timeout)) is not None:
        out.append(c)
    return out


def take(w: Watch, n: int, timeout: float = 30.0) -> list[Change]:
    """The next ``n`` changes (fewer if they do not come within ``timeout`` seconds)."""
    out: list[Change] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and (c := w.get(max(0.0, deadline - time.monotonic()))) is not None:
        out.append(c)
    return out


def logged(cluster: Cluster, start: str) -> dict[int, list[list[Any]]]:
    """What each shard's log holds after ``start`` (read from the files, owners stopped): per
    shard ``[txn, n, table, key, value]`` in log order, ``n`` the change's place in its txn."""
    schema = cluster.config.load_schema()
    positions = parse_cursor(start, cluster.config.shards)
    out = {}
    for s, pos in enumerate(positions):
        with lmshard.open(cluster.config.shard_dir(s), schema, readonly=True) as store:
            w = store.watch(since=format_cursor([pos]))
            out[s] = [[c.txn_id, parse_cursor(c.cursor, 1)[0].n, c.table, norm(c.key),
                       norm(c.value)] for c in drain(w, 0.05)]
    return out


def watched(path: Path, shards: int) -> dict[int, list[list[Any]]]:
    """A watcher's file as ``logged`` gives a log: per shard ``[txn, n, table, key, value]``."""
    out: dict[int, list[list[Any]]] = {s: [] for s in range(shards)}
    for line in path.read_text().splitlines():
        shard, txn, table, key, value, cursor = json.loads(line)
        out[shard].append([txn, parse_cursor(cursor, shards)[shard].n, table, key, value])
    return out


@pytest.mark.slow
def test_every_acked_write_is_watched_once_in_order_through_owner_and_watcher_kills(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=4)
    cluster.start()
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    try:
        with cluster.client() as c:
            c.put("users", uuid.UUID(int=1), {"email": "taken@x", "country": "de"})
            with c.watch() as w:
                start = w.cursor
        cfg = str(cluster.config_path)
        stop = str(tmp_path / "stop.json")
        outs = [str(tmp_path / f"watcher{i}.jsonl") for i in range(WATCHERS)]
        results = [tmp_path / f"writer{i}.json" for i in range(WRITERS)]

        def watcher(i: int) -> Any:
            p = ctx.Process(target=change_workers.feed_watcher, args=(cfg, start, outs[i], stop,
                                                                       4))
            p.start()
            procs.append(p)
            return p

        watchers = [watcher(i) for i in range(WATCHERS)]
        writers = [ctx.Process(target=change_workers.feed_writer,
                               args=(cfg, i, WRITE_SECONDS, str(results[i])))
                   for i in range(WRITERS)]
        for p in writers:
            p.start()
            procs.append(p)
        wait_for("the watchers to see writes", lambda: all(
            os.path.exists(o) and os.path.getsize(o) > 0 for o in outs))
        lines_before_kill = 0
        for shard, kill_watcher in [(0, False), (2, True), (1, False), (3, False)]:
            time.sleep(1.0)
            cluster.kill(shard)  # SIGKILL mid-write
            time.sleep(0.3)
            cluster.start(shard)
            if kill_watcher:
                watchers[0].kill()
                watchers[0].join()
                lines_before_kill = len(Path(outs[0]).read_text().splitlines())
                watchers[0] = watcher(0)  # carries on from the cursor in its file
        for p in writers:
            p.join(120)
            assert p.exitcode == 0
        with cluster.client() as c:
            stats = c.stats()["shards"]
            targets = [stats[s]["changes"]["newest_txn"] for s in range(4)]
        tmp = stop + ".tmp"
        Path(tmp).write_text(json.dumps(targets))
        os.replace(tmp, stop)
        for p in watchers:
            p.join(60)
            assert p.exitcode == 0
        for o in outs:
            assert not os.path.exists(o + ".error"), Path(o + ".error").read_text()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        cluster.stop()

    log = logged(cluster, start)
    writes = [json.loads(r.read_text()) for r in results]
    assert all(r["error"] is None for r in writes), [r["error"] for r in writes]
    assert sum(r["retries"] for r in writes) > 0  # the writers did live through the kills

    # The log: every acked write exactly once, in the transaction its ack named, a batch's
    # changes together and in its order; an unknown batch at most once; a refused one nowhere.
    where: dict[tuple[str, str, str], list[tuple[int, int, int]]] = {}
    for s, entries in log.items():
        assert [e[:2] for e in entries] == sorted(e[:2] for e in entries)  # commit order
        assert len({(e[0], e[1]) for e in entries}) == len(entries)
        for txn, n, table, key, value in entries:
            where.setdefault((table, json.dumps(key), json.dumps(value)), []).append((s, txn, n))
    for r in writes:
        assert len(r["acked"]) > 20
        for batch in r["acked"]:
            places: dict[int, list[tuple[int, int]]] = {}
            for table, key, value in batch["effects"]:
                found = where.get((table, json.dumps(key), json.dumps(value)), [])
                assert len(found) == 1, (table, key, value, found)
                s, txn, n = found[0]
                assert txn == batch["txn_ids"][str(s)], (table, key, batch)
                places.setdefault(s, []).append((txn, n))
            for ns in places.values():
                assert [n for _, n in ns] == list(range(ns[0][1], ns[0][1] + len(ns)))
        for _n, _exc, effects in r["unknown"]:
            for table, key, value in effects:
                assert len(where.get((table, json.dumps(key), json.dumps(value)), [])) <= 1
        counts = [v for (t, k, v), _ in sorted(where.items(), key=lambda kv: kv[1])
                  if t == "counters" and k == json.dumps(f"w{writes.index(r)}")]
        assert [json.loads(v) for v in counts] == list(range(1, len(counts) + 1))
    refused = {json.dumps(u) for r in writes for u in r["refused"]}
    assert len(refused) >= 2 * WRITERS
    assert not [k for t, k, _ in where if t == "users" and k in refused]

    # Each watcher saw exactly the log, per shard in order: so nothing missed, nothing
    # repeated (also not by the watcher killed and restarted from its stored cursor).
    for o in outs:
        assert watched(Path(o), 4) == log
    assert 0 < lines_before_kill < len(Path(outs[0]).read_text().splitlines())


def test_watch_filters_start_and_a_restarted_owner(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=2, sync=False)
    cluster.start()
    try:
        with cluster.client() as c:
            c.put("counters", "old", 0)
            everything = c.watch()
            counters = c.watch("counters")
            series = c.watch("events", prefix=("s1",))
            c.put("events", ("s1", 1), {"v": 1})
            c.put("events", ("s2", 1), {"v": 2})
            c.put("counters", "a", 1)
            c.put("events", ("s1", 2), {"v": 3})
            c.put("items", 7, {"group": 1})
            for since in ["now", "start"] * 5:  # one owner's changes may come before
                t = time.monotonic()                # another's STARTED: no wait for them
                c.watch(since=since).close()
                assert time.monotonic() - t < 5.0, since  # (the client timeout is 15 s)
            from_start = take(c.watch(since="start"), 6)
            assert sorted(x.key for x in from_start if x.table == "counters") == ["a", "old"]
            assert len(from_start) == 6
            assert [(x.table, x.key) for x in take(counters, 1)] == [("counters", "a")]
            assert [x.key for x in take(series, 2)] == [("s1", 1), ("s1", 2)]
            seen = take(everything, 5)
            assert sorted(str(x.key) for x in seen) == sorted(
                str(k) for k in [("s1", 1), ("s2", 1), "a", ("s1", 2), 7])

            # An owner restart under a live watch: nothing missed, nothing repeated.
            keys = [f"k{i:02d}" for i in range(40)]
            for k in keys[:20]:
                c.put("counters", k, 1)
            got = take(everything, 10)
            for s in range(2):
                cluster.kill(s)
                cluster.start(s)
            for k in keys[20:]:
                c.put("counters", k, 2)
            got += take(everything, 30)  # the watch notices the silence and reconnects
            got += drain(everything, 0.5)  # and nothing more: nothing repeated
            assert sorted(x.key for x in got if x is not None) == keys
            per_shard: dict[int, list[int]] = {}
            for x in got:
                assert x is not None
                per_shard.setdefault(x.shard, []).append(x.txn_id)
            assert all(t == sorted(t) and len(set(t)) == len(t) for t in per_shard.values())
            # effects, as the owner logs them: an incr as its result, a refused cas and a
            # delete of a missing row not at all
            assert c.incr("counters", "last", 3) == 3
            assert not c.cas("counters", "last", 10, expected=99)
            assert c.cas("counters", "last", 4, expected=3)
            assert not c.delete("counters", "never-there")
            assert c.delete("counters", "last")
            rest = take(counters, 43)  # 40 k's and 3 of "last", shards interleaved as they come
            assert sorted(x.key for x in rest if x.key != "last") == keys
            assert [(x.key, x.value, x.op) for x in rest if x.key == "last"] == [
                ("last", 3, "put"), ("last", 4, "put"), ("last", None, "delete")]
            assert drain(counters, 0.3) == []
            assert [x.key for x in drain(series, 0.1)] == []
    finally:
        cluster.stop()


def test_log_stays_bounded_and_a_watcher_left_behind_gets_an_oldest_cursor_that_works(
        tmp_path: Path) -> None:
    retain = 1024 * 1024
    cluster = Cluster(tmp_path, shards=2, sync=False, changes_retain="1MiB")
    cluster.start()
    try:
        with cluster.client() as c:
            left_behind = c.watch("blobs")
            c.put("blobs", 0, b"first")
            assert left_behind.get(5) is not None
            cursor = left_behind.cursor  # and then not read while the log moves on
            sizes = []
            value = os.urandom(2000)
            for start in range(1, 3001, 10):  # > the watch's credit window per shard
                with c.batch() as b:
                    for k in range(start, start + 10):
                        b.put("blobs", k, value)
                if start % 50 == 1:
                    stats = c.stats()["shards"]
                    sizes += [stats[s]["changes"]["bytes"] for s in range(2)]
            stats = c.stats()["shards"]
            assert max(sizes) <= retain + 64 * 4096, max(sizes)
            assert min(stats[s]["changes"]["floor"] for s in range(2)) > 10
            with pytest.raises(ChangesCompacted) as info:
                drain(left_behind)
            shard, oldest = info.value.shard, info.value.oldest
            assert shard in (0, 1) and oldest is not None
            positions = parse_cursor(oldest, 2)
            assert positions[shard].txn == stats[shard]["changes"]["floor"]
            assert positions[1 - shard] == parse_cursor(left_behind.cursor, 2)[1 - shard]
            # a shard at a time: resuming from .oldest may find the other shard compacted too
            since, tries = cursor, 0
            while True:
                try:
                    resumed = c.watch("blobs", since=since)
                    got = drain(resumed, 2.0)
                    break
                except ChangesCompacted as exc:
                    assert exc.oldest is not None
                    since, tries = exc.oldest, tries + 1
            assert 1 <= tries <= 2
            assert got and all(x.value == value for x in got) and max(x.key for x in got) == 3000
            for s in range(2):
                keys = [x.key for x in got if x.shard == s]
                assert keys == sorted(keys) and len(keys) > 100
            c.put("blobs", 99999, b"new")
            assert [x.key for x in take(resumed, 1)] == [99999]
    finally:
        cluster.stop()


def test_a_gap_in_an_owners_messages_restarts_the_watch_from_what_came_in_order(
        tmp_path: Path) -> None:
    """An owner played by this test on the change-feed socket: it loses message 2 of a
    watch; the watch must not take message 3, but start again after message 1."""
    import threading

    import msgpack
    import zmq

    from lmshard import changes_wire as cw
    from lmshard.changes import Position

    cluster = Cluster(tmp_path, shards=1, sync=False)  # its config; no owner started
    history = "0123456789abcdef"
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.bind(cluster.config.changes_endpoint(0))
    asked: list[list[Any]] = []
    failed: list[BaseException] = []

    def owner() -> None:
        try:
            with cluster.client() as c:
                ct = c.table("counters")

                def changes(ident: bytes, wid: int, seq: int, txn: int) -> None:
                    data = msgpack.packb([[ct.tid, ct.kenc(f"k{txn}"), ct.dumps(txn)]])
                    sock.send_multipart([ident, cw.pack(cw.CHANGES, wid, seq, txn, None),
                                         data])

                for txns in ([5, None, 7], [6, 7]):  # the first time, message 2 is lost
                    while True:
                        ident, frame = sock.recv_multipart()
                        msg = cw.decode([frame], "watcher")
                        if msg.message is cw.WATCH:
                            break
                    asked.append(msg.values[:3])
                    h, txn, n = msg.values[:3]
                    sock.send_multipart([ident, cw.pack(cw.STARTED, msg.watch_id, h, txn, n)])
                    for seq, t in enumerate(txns, 1):
                        if t is not None:
                            changes(ident, msg.watch_id, seq, t)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    try:
        with cluster.client() as c, c.watch(
                since=format_cursor([Position(history, 5)])) as w:
            got = [w.get(10) for _ in range(3)]
            assert w.get(0.5) is None
    finally:
        thread.join(15)
        sock.close()
    assert not failed, failed
    assert [(x.key, x.txn_id) for x in got if x is not None] == [
        ("k5", 5), ("k6", 6), ("k7", 7)]
    assert asked == [[history, 5, 0], [history, 6, 0]]
