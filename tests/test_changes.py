"""The change log of an embedded store (``lmshard.changes``) and ``store.watch()`` over it.

What is logged (effects, not intents), what is not (a failed batch, a delete of a missing row),
cursors that resume exactly, retention and ChangesCompacted, bad cursors, a new history after a
compacted copy or after the log was switched off, and a read-only process following the writer.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard.changes import format_cursor, parse_cursor, record_effects
from lmshard.errors import ChangesCompacted, ConflictError, InvalidCursor, UniqueViolation
from lmshard.watch import Change, Watch
from tests import change_workers
from tests.conftest import make_schema, uid, user


def _open(path: Path, **options: Any) -> lmshard.Store:
    return lmshard.open(path, make_schema(), changes=True, **options)


def drain(w: Watch, timeout: float = 0.3) -> list[Change]:
    """Every change the watch has now (until none comes for ``timeout`` seconds)."""
    out = []
    while (c := w.get(timeout)) is not None:
        out.append(c)
    return out


def seen(changes: list[Change]) -> list[tuple[str, Any, Any, str]]:
    return [(c.table, c.key, c.value, c.op) for c in changes]


def log_records(store: lmshard.Store) -> list[tuple[int, list[list[Any]]]]:
    """The records the store's log holds, decoded: (txn id, effects)."""
    assert store.changes is not None
    with store.read() as r:
        return [(t, record_effects(rec)) for t, rec in store.changes.read(r.txn, 0,
                                                                          max_records=10**6)]


def test_each_write_is_logged_as_its_effect(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        w = s.watch()
        s.put("counters", "a", 1)
        assert s.incr("counters", "a", 4) == 5  # logged as the put of its result
        assert s.cas("counters", "a", 6, expected=5)
        assert not s.cas("counters", "a", 7, expected=99)  # refused: nothing logged
        assert not s.delete("counters", "missing")  # nothing to delete: nothing logged
        assert s.delete("counters", "a")
        with s.write() as t:  # a delete of a missing row beside other writes: only those
            t.delete("counters", "missing")
            t.put("users", uid(1), user("a@x"))
            t.put("counters", "b", 2)
        s.put("counters", "c", 3)
        assert s.purge("counters") == 2  # one delete per row dropped
        got = drain(w)
    assert seen(got) == [
        ("counters", "a", 1, "put"),
        ("counters", "a", 5, "put"),
        ("counters", "a", 6, "put"),
        ("counters", "a", None, "delete"),
        ("users", uid(1), user("a@x"), "put"),
        ("counters", "b", 2, "put"),
        ("counters", "c", 3, "put"),
        ("counters", "b", None, "delete"),
        ("counters", "c", None, "delete"),
    ]
    txns = [c.txn_id for c in got]
    assert txns == sorted(txns)
    assert len(set(txns)) == 7  # one transaction each, but the write block and the purge
    assert txns[4] == txns[5] and txns[7] == txns[8]
    assert all(c.shard == 0 for c in got)


def test_a_failed_batch_appears_nowhere_in_the_log(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        s.put("users", uid(1), user("taken@x"))
        s.put("counters", "n", 1)
        before = log_records(s)
        cursor = s.watch().cursor
        with pytest.raises(UniqueViolation), s.batch() as b:
            b.put("counters", "from-unique", 1)
            b.put("users", uid(2), user("fresh@x"))
            b.put("users", uid(3), user("taken@x"))
        with pytest.raises(ConflictError), s.batch() as b:
            b.put("counters", "from-cas", 1)
            b.incr("counters", "n", 1)
            b.cas("counters", "n", 100, expected=99)
        with pytest.raises(RuntimeError), s.write() as t:  # an exception in the block
            t.put("counters", "from-raise", 1)
            raise RuntimeError("abandon")
        assert log_records(s) == before
        s.put("counters", "after", 1)
        got = drain(s.watch(since=cursor))
        assert seen(got) == [("counters", "after", 1, "put")]
        assert s.get("counters", "n") == 1 and s.get("users", uid(2)) is None


def test_a_cursor_resumes_exactly_after_its_change(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        start = s.watch().cursor
        for i in range(5):
            with s.batch() as b:
                for j in range(3):
                    b.put("counters", f"k{i}.{j}", i * 10 + j)
                if i:
                    b.delete("counters", f"k{i - 1}.0")
        everything = drain(s.watch(since=start))
        assert len(everything) == 5 * 3 + 4
        for i, c in enumerate(everything):  # also from a cursor inside a transaction
            assert drain(s.watch(since=c.cursor), 0.05) == everything[i + 1:], i
        w = s.watch(since=start)
        first = [w.get(1) for _ in range(7)]
        assert first == everything[:7]
        assert drain(s.watch(since=w.cursor), 0.05) == everything[7:]
        rest = drain(w)
        assert rest == everything[7:]
        assert drain(s.watch(since=w.cursor), 0.05) == []  # the end: nothing repeated
        s.put("counters", "later", 1)
        assert seen(drain(s.watch(since=w.cursor))) == [("counters", "later", 1, "put")]
        assert seen(drain(w)) == [("counters", "later", 1, "put")]


def test_start_now_and_filters(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        s.put("counters", "old", 1)
        now = s.watch()
        by_table = s.watch("users", since="start")
        by_prefix = s.watch("events", prefix=("a",), since="start")
        s.put("events", ("a", 1), {"x": 1})
        s.put("events", ("b", 1), {"x": 2})
        s.put("users", uid(1), user("u@x"))
        s.put("events", ("a", 2), {"x": 3})
        assert [c.key for c in drain(s.watch(since="start"))] == [
            "old", ("a", 1), ("b", 1), uid(1), ("a", 2)]
        assert [c.key for c in drain(now)] == [("a", 1), ("b", 1), uid(1), ("a", 2)]
        assert [c.key for c in drain(by_table)] == [uid(1)]
        assert [c.key for c in drain(by_prefix)] == [("a", 1), ("a", 2)]
        # a filtered watch's cursor resumes after what it saw, not after what it skipped
        assert drain(s.watch("events", prefix=("a",), since=by_prefix.cursor)) == []
        s.put("events", ("a", 3), {"x": 4})
        assert [c.key for c in drain(by_prefix)] == [("a", 3)]


def test_trimmed_log_gets_changes_compacted_with_an_oldest_cursor_that_works(
        tmp_path: Path) -> None:
    retain = 64 * 1024
    with _open(tmp_path / "s", changes_retain=retain) as s:
        start = s.watch().cursor
        behind = s.watch()
        s.put("blobs", 0, b"x" * 1000)
        assert behind.get(1) is not None  # read once, then left behind
        assert s.changes is not None
        sizes = []
        for i in range(1, 400):
            s.put("blobs", i, bytes([i % 256]) * 1000)
            with s.read() as r:
                sizes.append(s.changes.size(r.txn))
        assert max(sizes) <= retain + 16 * 4096  # trimmed as it goes, a few records at a time
        records = log_records(s)
        floor = records[0][0]
        assert floor > 10 and records[-1][1][0][1] == (399).to_bytes(8, "big")
        with pytest.raises(ChangesCompacted) as info:
            s.watch(since=start)
        oldest = info.value.oldest
        assert oldest is not None
        assert parse_cursor(oldest, 1)[0].txn == floor == s.changes.floor
        kept = drain(s.watch(since=oldest))
        assert [c.key for c in kept] == list(range(400 - len(records), 400))
        assert [c.key for c in drain(s.watch(since="start"))] == [c.key for c in kept]
        with pytest.raises(ChangesCompacted) as info:  # the watch left behind, too
            behind.get(1)
        assert info.value.oldest == oldest
        with pytest.raises(ChangesCompacted):  # and stays failed
            behind.get(0)


def test_garbage_and_ahead_cursors_are_invalid(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        s.put("counters", "a", 1)
        good = s.watch().cursor
        (p,) = parse_cursor(good, 1)
        for bad in ["", "now!", "c1-", "c2-" + good[3:], good + "_" + good[3:], good[:-2],
                    f"c1-{p.history}.{p.txn:x}", f"c1-{p.history[:-1]}.1.0",
                    f"c1-{p.history.upper()}.1.0", f"c1-{p.history}.-1.0",
                    f"c1-{p.history}.zz.0", "c1-" + "0" * 9000, 42, b"c1-", ["now"]]:
            with pytest.raises(InvalidCursor):
                s.watch(since=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidCursor):  # ahead of the log
            s.watch(since=format_cursor([p.__class__(p.history, p.txn + 100)]))
        assert s.watch(since=format_cursor([p.__class__(p.history, p.txn)])).get(0) is None
        # a cursor of another store's log: compacted (another history), not invalid
        with _open(tmp_path / "other") as other, pytest.raises(ChangesCompacted):
            other.watch(since=good)


def test_a_compacted_copy_starts_a_new_history(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    with _open(tmp_path / "s") as s:
        for i in range(20):
            s.put("counters", f"k{i}", i)
        old = s.watch(since="start")
        assert len(drain(old)) == 20
        cursor = old.cursor
        history = parse_cursor(cursor, 1)[0].history
        s.env.copy(str(copy), compact=True)  # transaction ids start again at 1
    with _open(copy) as c:
        assert c.env.info()["last_txnid"] < 20
        assert c.changes is not None and c.changes.history != history
        assert log_records(c) == []
        with pytest.raises(ChangesCompacted) as info:
            c.watch(since=cursor)
        oldest = info.value.oldest
        assert oldest is not None and parse_cursor(oldest, 1)[0].history == c.changes.history
        w = c.watch(since=oldest)
        c.put("counters", "k0", 100)
        assert seen(drain(w)) == [("counters", "k0", 100, "put")]
    with _open(copy) as c:  # reopened: the same (new) history carries on
        assert seen(drain(c.watch(since=oldest))) == [("counters", "k0", 100, "put")]


def test_log_switched_off_and_on_starts_a_new_history(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with _open(path) as s:
        s.put("counters", "a", 1)
        cursor = s.watch().cursor
    with lmshard.open(path, make_schema()) as s:  # the log off
        s.put("counters", "b", 2)
        with pytest.raises(ChangesCompacted):
            s.watch()
        assert s.changes is not None and not s.changes.enabled
    with _open(path) as s:  # on again: what was kept is useless, a new history
        assert log_records(s) == []
        with pytest.raises(ChangesCompacted) as info:
            s.watch(since=cursor)
        oldest = info.value.oldest
        assert oldest is not None
        s.put("counters", "c", 3)
        assert seen(drain(s.watch(since=oldest))) == [("counters", "c", 3, "put")]
        assert seen(drain(s.watch(since="start"))) == [("counters", "c", 3, "put")]


def test_a_store_without_the_log_cannot_be_watched(tmp_path: Path) -> None:
    with lmshard.open(tmp_path / "s", make_schema()) as s:
        s.put("counters", "a", 1)
        with pytest.raises(ChangesCompacted):
            s.watch()
        assert log_records(s) == []


def test_trim_keeps_the_newest_record_and_trims_by_age(tmp_path: Path) -> None:
    with _open(tmp_path / "s", changes_retain=1) as s:
        for i in range(50):
            s.put("counters", f"k{i}", i)
        records = log_records(s)
        assert len(records) == 1 and records[0][1][0][1] == s.tables["counters"].kenc("k49")
    with _open(tmp_path / "t", changes_retain_seconds=0.3) as s:
        for i in range(5):
            s.put("counters", f"k{i}", i)
        assert len(log_records(s)) == 5
        time.sleep(0.4)
        s.put("counters", "new", 1)
        assert [t for t, _ in log_records(s)] == [s.env.info()["last_txnid"]]
        assert s.changes is not None and s.changes.floor == s.env.info()["last_txnid"]


def test_a_read_only_process_watches_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s"
    out = tmp_path / "seen.json"
    with _open(path) as s:
        s.put("counters", "before", 0)
        cursor = s.watch().cursor
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=change_workers.read_only_watcher,
                        args=(str(path), cursor, 24, str(out)))
        p.start()
        try:
            for i in range(10):
                with s.batch() as b:
                    b.put("counters", f"k{i}", i)
                    b.put("events", ("s", i), {"i": i})
                    if i % 3 == 0:
                        b.delete("counters", f"k{i}")
            expected = [[c.table, str(c.key), c.value, c.txn_id, c.cursor]
                        for c in drain(s.watch(since=cursor))]
            p.join(60)
        finally:
            if p.is_alive():
                p.kill()
    assert p.exitcode == 0
    result = json.loads(out.read_text())
    assert result["error"] is None, result["error"]
    assert len(expected) == 24  # 10 x 2 puts, 4 deletes
    assert result["seen"] == expected
    assert os.path.exists(path / "data.mdb")


def test_a_watch_catches_up_over_more_records_than_one_read_returns(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        w = s.watch()
        for i in range(700):  # read() returns 256 records at most
            s.put("counters", f"k{i}", i)
        assert [c.value for c in drain(w)] == list(range(700))
        assert [c.value for c in drain(s.watch(since="start"))] == list(range(700))
