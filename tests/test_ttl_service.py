"""Rows that expire, against real shard owners: the sweep keeps up with 100,000 rows expiring a
minute (measured), every client read path hides expired rows before the sweep, and expiry
survives a restart and a backup restored elsewhere; the sweep's deletes reach watchers."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmshard
import lmshard.aio
from lmshard.bound_tables import EXPIRY_SIZE
from lmshard.ops import backup
from lmshard.testing import LocalService
from tests.cluster import REPO, restore_into, wait_for
from tests.test_readers import Readers
from tests.ttl_schema import cache, sessions, tokens

RATE = 100_000 / 60
"""Rows expiring per second in the sweep drill: 100,000 a minute."""
GONE_WITHIN = 2.0
"""Seconds after its expiry by which a row must be deleted from disk."""


class TTLService(LocalService):
    """Owners serving ``tests.ttl_schema:schema``, fsync on like production."""

    def __init__(self, base: Path, shards: int = 2, **settings: Any) -> None:
        settings.setdefault("sync", True)
        super().__init__(base, "tests.ttl_schema:schema", shards=shards,
                         python_path=[str(REPO)], **settings)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TTLService]:
    s = TTLService(tmp_path / "svc")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _on_disk(c: lmshard.Client, table: lmshard.Table) -> dict[str, int]:
    """Rows, index entries and expiry entries stored for ``table`` on every shard (expired
    rows included), read from the shards' files; and the oldest expiry (ms) stored."""
    out = {"rows": 0, "index": 0, "expiry": 0, "oldest": 0}
    oldest = []
    for shard in range(c.shards):
        st = c.local_store(shard)
        assert st is not None
        b = st.tables[table]
        with st.read() as r:
            out["rows"] += r.txn.stat(b.db)["entries"]
            out["index"] += sum(r.txn.stat(bi.db)["entries"] for bi in b.indexes)
            out["expiry"] += r.txn.stat(b.expiry_db)["entries"]
            cur = r.txn.cursor(db=b.expiry_db)
            if cur.first():
                oldest.append(int.from_bytes(cur.key()[:EXPIRY_SIZE], "big"))
    out["oldest"] = min(oldest, default=0)
    return out


def _sweep_drill(service: TTLService, seconds: float) -> None:
    """Rows expiring at RATE for ``seconds``; every 20 ms, how long the oldest expired row
    still on disk has been expired. Asserts it never reaches GONE_WITHIN."""
    n = int(RATE * seconds)
    with service.client() as c:
        write_started = time.time()
        first = write_started + 2.0 + n / 20_000  # the rows are all written before they expire
        with c.writer(batch_size=1000) as w:
            for i in range(n):
                w.put(cache, i, {"g": i % 7}, ttl=first + i / RATE - time.time())
        assert c.count(cache) == n
        lags: list[float] = []
        end = first + seconds + GONE_WITHIN + 1.0
        while time.time() < end:
            disk = _on_disk(c, cache)
            now_ms = time.time() * 1000
            lags.append(max(0.0, (now_ms - disk["oldest"]) / 1000) if disk["oldest"] else 0.0)
            if disk["rows"] == 0 and time.time() > first + seconds:
                break
            time.sleep(0.02)
        disk = _on_disk(c, cache)
        owners = c.stats()["shards"]
    expired = sum(s["owner"]["expired_rows"] for s in owners.values())
    cpu = sum(s["owner"]["expiry_cpu_seconds"] for s in owners.values())
    print(f"\n{n:,} rows expiring at {RATE * 60:,.0f}/min over {seconds:.0f} s: oldest expired "
          f"row on disk for at most {max(lags):.3f} s (median of {len(lags)} samples while "
          f"due {statistics.median([x for x in lags if x > 0] or [0]):.3f} s); owners' CPU "
          f"{cpu * 1000 / max(expired, 1) * 1000:.1f} ms per 1,000 rows expired")
    assert disk == {"rows": 0, "index": 0, "expiry": 0, "oldest": 0}  # index entries too
    assert expired == n
    assert max(lags) < GONE_WITHIN


def test_the_sweep_keeps_up_with_100k_rows_expiring_a_minute(service: TTLService) -> None:
    _sweep_drill(service, 8.0)


@pytest.mark.slow
def test_the_sweep_keeps_up_for_a_whole_minute(service: TTLService) -> None:
    _sweep_drill(service, 60.0)


def _check_reads(get: Any, get_many: Any, exists: Any, scan: Any, count: Any,
                 lookup: Any, ttl: Any) -> None:
    """What every front end must answer about the rows ``_sessions`` wrote, once the short
    ones expired."""
    live = [f"s{i:02d}" for i in range(0, 40, 2)]
    assert get(sessions, "s01") is None and get(sessions, "s00") == {"user": 0, "n": 0}
    assert get_many(sessions, ["s00", "s01"]) == [{"user": 0, "n": 0}, None]
    assert exists(sessions, "s02") and not exists(sessions, "s03")
    assert [k for k, _ in scan(sessions)] == live
    assert [k for k, _ in scan(sessions, start="s10", limit=3)] == ["s10", "s12", "s14"]
    assert count(sessions) == 20 and count(sessions, start="s00", end="s10") == 5
    assert lookup(sessions, "by_user", 1) == []
    assert [k for k, _ in lookup(sessions, "by_user", 0)] == live
    assert lookup(tokens, "by_token", "gone") == []  # a unique index: the one-shard fast path
    assert lookup(tokens, "by_token", "kept") == [(2, {"token": "kept"})]
    assert ttl(sessions, "s01") == 0.0 and 3500 < ttl(sessions, "s00") <= 3600


def _sessions(c: lmshard.Client, short: float) -> None:
    with c.batch() as b:
        for i in range(40):
            b.put(sessions, f"s{i:02d}", {"user": i % 2, "n": i}, ttl=short if i % 2 else None)
    c.put(tokens, 1, {"token": "gone"}, ttl=short)
    c.put(tokens, 2, {"token": "kept"})


def test_every_client_read_path_hides_expired_rows_before_the_sweep(tmp_path: Path) -> None:
    svc = TTLService(tmp_path / "svc", readers=1)
    readers = Readers(svc)  # type: ignore[arg-type]
    svc.start()
    stopped: list[int] = []
    try:
        readers.start()
        with svc.client() as local, svc.client(local_reads=False) as pooled:
            _sessions(local, 1.0)
            for shard in range(svc.config.shards):  # no sweep from here on
                os.kill(svc.pid(shard), signal.SIGSTOP)
                stopped.append(shard)
            time.sleep(1.1)
            assert _on_disk(local, sessions)["rows"] == 40  # still stored
            assert _on_disk(local, tokens)["rows"] == 2
            for c in (local, pooled):
                _check_reads(c.get, c.get_many, c.exists,
                             lambda *a, c=c, **k: list(c.scan(*a, **k)), c.count, c.lookup,
                             c.ttl)
            assert pooled.counters()["remote_reads"] > 0 and local.counters()["remote_reads"] == 0

        async def through_async() -> None:  # its own maps: after the sync clients closed theirs
            async with lmshard.aio.connect(svc.config) as ac:
                assert [k async for k, _ in ac.scan(sessions)] == [
                    f"s{i:02d}" for i in range(0, 40, 2)]
                assert [k async for k, _ in ac.scan(sessions, start="s10", limit=3)] == [
                    "s10", "s12", "s14"]
                assert await ac.get(sessions, "s01") is None
                assert await ac.get_many(sessions, ["s00", "s01"]) == [{"user": 0, "n": 0}, None]
                assert not await ac.exists(sessions, "s03") and await ac.exists(sessions, "s02")
                assert await ac.count(sessions) == 20
                assert await ac.lookup(sessions, "by_user", 1) == []
                assert await ac.lookup(tokens, "by_token", "gone") == []
                assert await ac.lookup(tokens, "by_token", "kept") == [(2, {"token": "kept"})]
                assert await ac.ttl(sessions, "s01") == 0.0

        asyncio.run(through_async())
        for shard in stopped:
            os.kill(svc.pid(shard), signal.SIGCONT)
        stopped.clear()
        with svc.client() as local:
            wait_for("the sweep", lambda: _on_disk(local, sessions)["rows"] == 20, timeout=10)
            assert _on_disk(local, sessions)["index"] == 20
    finally:
        for shard in stopped:
            os.kill(svc.pid(shard), signal.SIGCONT)
        readers.stop()
        svc.stop()


def test_expiry_survives_a_restart_and_the_sweep_is_watched(service: TTLService) -> None:
    with service.client() as c:
        with c.watch(sessions) as watch:
            c.put(sessions, "keep", {"user": 1}, ttl=120)
            c.put(sessions, "brief", {"user": 2}, ttl=1.0)
            before = c.ttl(sessions, "keep")
            for shard in range(service.config.shards):
                service.kill(shard)
            service.start()
            assert c.ttl(sessions, "keep") == pytest.approx(before, abs=5)
            changes: list[Any] = []
            wait_for("the delete of the expired row",
                     lambda: changes.extend(filter(None, [watch.get(0.2)])) or any(
                         ch.op == "delete" for ch in changes), timeout=15)
        # one shard's changes come in commit order; the two rows may live on two shards
        assert sorted((ch.op, ch.key) for ch in changes) == [
            ("delete", "brief"), ("put", "brief"), ("put", "keep")]
        assert {ch.key: ch.value for ch in changes if ch.op == "put"} == {
            "keep": {"user": 1}, "brief": {"user": 2}}  # the values as put, no expiry header
        assert c.persist(sessions, "keep") is True and c.ttl(sessions, "keep") is None
        assert _on_disk(c, sessions)["rows"] == 1


def test_a_restored_backup_keeps_expiry_times(service: TTLService, tmp_path: Path) -> None:
    with service.client() as c:
        c.put(sessions, "keep", {"user": 1}, ttl=300)
        c.put(sessions, "brief", {"user": 2}, ttl=2.0)
        c.put(sessions, "forever", {"user": 3})
        c.persist(sessions, "forever")
        before = c.ttl(sessions, "keep")
    result = backup.take_backup(service.config, tmp_path / "bk")
    restored = TTLService(tmp_path / "restored")
    restore_into(result.path, restored)
    restored.start()
    try:
        with restored.client() as c:
            assert c.ttl(sessions, "keep") == pytest.approx(before, abs=10)
            assert c.ttl(sessions, "forever") is None
            wait_for("the restored row to expire and be swept",
                     lambda: _on_disk(c, sessions)["rows"] == 2, timeout=15)
            assert c.get(sessions, "brief") is None and c.count(sessions) == 2
    finally:
        restored.stop()


def test_no_row_sweep_on_a_shard_a_re_shard_moves_slots_into(service: TTLService) -> None:
    """Rows copied into a shard's incoming slots are the source's to expire (its deletes are
    replayed by the move): the destination's sweep waits until the move is done, so a watcher
    never sees one row deleted twice."""
    from dataclasses import replace

    from lmshard.protocol import OP_PUT, op
    from lmshard.resharding.admin import OwnerAdmin
    from lmshard.slot_state import RowSlots

    with service.client() as c, OwnerAdmin(service.config) as admin:
        key = next(k for k in range(1, 10_000) if c.table(cache).shard(k, c.table(cache).kenc(k))
                   == 0)
        c.put(cache, key, {"g": 1}, ttl=0.5)
        st = c.local_store(0)
        assert st is not None
        with st.read() as r:
            stored = r.get_raw(cache, st.tables[cache].kenc(key))
        b = st.tables[cache]
        slot = RowSlots(c.slot_map).slot(b, b.kenc(key))
        dest, _ = admin.state(1)
        admin.record(1, replace(dest, incoming=frozenset({slot})))
        admin.move_rows(1, [op(OP_PUT, cache.table_id.bytes, b.kenc(key), stored)])

        def on_disk(shard: int) -> bool:
            s = c.local_store(shard)
            assert s is not None
            with s.read() as r:
                return r.txn.get(b.kenc(key), db=s.tables[cache].db) is not None

        wait_for("the source's sweep", lambda: not on_disk(0), timeout=10)
        time.sleep(1.0)  # five row sweep intervals: the destination's waits
        assert on_disk(1)
        admin.record(1, dest)  # the move given up: the rows are the shard's own again
        wait_for("the destination's sweep", lambda: not on_disk(1), timeout=10)
