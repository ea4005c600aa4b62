"""Rows that expire, on the embedded store: every read path hides them at once, deletes take
their index entries along and reach the change log, expiry survives a restart, bad input is
refused at the call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lmshard
from lmshard.bound_tables import EXPIRY_SIZE, NO_EXPIRY, expiry_of
from lmshard.errors import SchemaError, SchemaMismatch, TTLError
from tests.ttl_schema import cache, plain, schema, sessions, tallies, tokens

SHORT = 0.3
"""Seconds to live of the rows a test lets expire."""


@pytest.fixture
def st(tmp_path: Path) -> Iterator[lmshard.Store]:
    with lmshard.open(tmp_path / "s", schema, changes=True) as s:
        yield s


def _expire_soon(st: lmshard.Store) -> None:
    """Sessions 0..9 of users 0/1, half of them expiring in SHORT seconds; then wait."""
    with st.write() as w:
        for i in range(10):
            w.put(sessions, f"s{i}", {"user": i % 2, "n": i}, ttl=SHORT if i % 2 else None)
    time.sleep(SHORT + 0.05)


def _stored_rows(st: lmshard.Store, table: lmshard.Table) -> int:
    with st.read() as r:
        return int(r.txn.stat(st.tables[table].db)["entries"])


def test_every_read_path_hides_expired_rows_before_they_are_deleted(
        st: lmshard.Store) -> None:
    _expire_soon(st)
    assert _stored_rows(st, sessions) == 10  # still on disk: no write since
    live = [f"s{i}" for i in range(0, 10, 2)]
    assert st.get(sessions, "s1") is None and st.get(sessions, "s1", "gone") == "gone"
    assert st.get(sessions, "s0") == {"user": 0, "n": 0}
    assert not st.exists(sessions, "s1") and st.exists(sessions, "s2")
    assert st.get_many(sessions, ["s0", "s1", "s2"], 0) == [{"user": 0, "n": 0}, 0,
                                                              {"user": 0, "n": 2}]
    assert [k for k, _ in st.scan(sessions)] == live
    assert [k for k, _ in st.scan(sessions, reverse=True)] == live[::-1]
    assert [k for k, _ in st.scan(sessions, start="s1", limit=2)] == ["s2", "s4"]
    assert [k for k, _ in st.scan(sessions, where=lambda v: v["n"] < 5)] == ["s0", "s2", "s4"]
    assert st.count(sessions) == 5 and st.count(sessions, start="s1", end="s5") == 2
    assert st.lookup(sessions, "by_user", 1) == []
    assert [k for k, _ in st.lookup(sessions, "by_user", 0)] == live
    assert st.marshal(sessions, "s1") is None
    assert st.ttl(sessions, "s1") == 0.0
    with st.read() as r:
        assert r.get(sessions, "s3") is None and r.get_raw(sessions, b"s3") is None
        assert r.lookup_keys(sessions, "by_user", 1) == []
        assert list(r.scan_raw(sessions)) == list(r.scan_raw(sessions, b"s", None))
        assert len(list(r.scan_raw(sessions))) == 5
        assert r.expired_rows(sessions) == 5
    # a unique index and a prefix lookup
    st.put(tokens, 1, {"token": "abc"}, ttl=SHORT)
    st.put(tokens, 2, {"token": "abd"})
    time.sleep(SHORT + 0.05)
    assert st.lookup(tokens, "by_token", "abc") == []
    assert [k for k, _ in st.lookup(tokens, "by_token", "ab", prefix=True)] == [2]


def test_default_and_per_row_ttl_persist_and_incr(st: lmshard.Store) -> None:
    st.put(sessions, "a", {"user": 1})
    assert 3599 < (st.ttl(sessions, "a") or 0) <= 3600  # the table's default
    st.put(sessions, "b", {"user": 1}, ttl=60)
    assert 59 < (st.ttl(sessions, "b") or 0) <= 60
    st.put(tokens, 1, {"token": None})  # ttl=0: no default, never expires
    assert st.ttl(tokens, 1) is None
    st.put(tokens, 2, {"token": None}, ttl=5)
    assert 4 < (st.ttl(tokens, 2) or 0) <= 5
    assert st.persist(tokens, 2) is True and st.ttl(tokens, 2) is None
    assert st.persist(tokens, 2) is False and st.persist(tokens, 99) is False
    assert st.ttl(tokens, 99) == 0.0
    assert st.get(tokens, 2) == {"token": None}
    # incr keeps the row's expiry; a new row gets the default
    st.put(tallies, ("c", ""), 5, ttl=30)
    assert st.incr(tallies, ("c", ""), 2) == 7
    assert 29 < (st.ttl(tallies, ("c", "")) or 0) <= 30
    assert st.incr(tallies, ("d", "")) == 1 and (st.ttl(tallies, ("d", "")) or 0) > 86000
    # an expired counter counts from 0 again
    st.put(tallies, ("e", ""), 5, ttl=SHORT)
    time.sleep(SHORT + 0.05)
    assert st.incr(tallies, ("e", "")) == 1
    # the same in a write transaction and a batch
    with st.batch() as b:
        b.put(sessions, "c", {"user": 2}, ttl=10)
    assert 9 < (st.ttl(sessions, "c") or 0) <= 10
    assert st.marshal(sessions, "c")["ttl"] == pytest.approx(10, abs=1)  # type: ignore[index]


def test_an_expired_idempotency_key_is_free_again(st: lmshard.Store) -> None:
    def seen(key: str) -> bool:
        with st.write() as w:
            fresh = w.cas(tallies, ("hits", key), True, expected=None)
            if fresh:
                w.incr(tallies, ("hits", ""))
        return not fresh

    st.put(tallies, ("hits", "req-1"), True, ttl=SHORT)
    assert seen("req-1") is True  # a retry within its ttl is not counted
    time.sleep(SHORT + 0.05)
    assert seen("req-1") is False  # the key expired: the request counts as new
    assert st.get(tallies, ("hits", "")) == 1
    assert st.get_many(tallies, [("hits", "req-1")]) == [True]
    # compare-and-set by hash is taken over the value, not the expiry
    from lmshard import value_hash
    assert st.cas(tallies, ("hits", "req-1"), False, expected_hash=value_hash(
        tallies.value.dumps(True))) is True


def test_the_unique_value_of_an_expired_row_is_free(st: lmshard.Store) -> None:
    st.put(tokens, 1, {"token": "t"}, ttl=SHORT)
    with pytest.raises(lmshard.UniqueViolation):
        st.put(tokens, 2, {"token": "t"})
    time.sleep(SHORT + 0.05)
    st.put(tokens, 2, {"token": "t"})
    assert [k for k, _ in st.lookup(tokens, "by_token", "t")] == [2]
    assert _stored_rows(st, tokens) == 1  # the expired holder went


def test_expire_deletes_rows_and_index_entries_and_logs_the_deletes(st: lmshard.Store) -> None:
    with st.watch(sessions, since="now") as watch:
        _expire_soon(st)
        assert st.expire() == 5
        assert st.expire() == 0
        changes = []
        while (c := watch.get(0.2)) is not None:
            changes.append(c)
    puts = [c for c in changes if c.op == "put"]
    assert [c.value for c in puts] == [{"user": i % 2, "n": i} for i in range(10)]  # as put
    assert sorted(c.key for c in changes if c.op == "delete") == ["s1", "s3", "s5", "s7", "s9"]
    stats = st.stats()["tables"]["sessions"]
    assert stats["rows"] == 5 and stats["indexes"]["by_user"]["entries"] == 5
    with st.read() as r:
        assert r.txn.stat(st.tables[sessions].expiry_db)["entries"] == 5  # the live ones
        assert r.expired_rows(sessions) == 0


def test_each_write_transaction_deletes_a_few_expired_rows(st: lmshard.Store) -> None:
    with st.write() as w:
        for i in range(250):
            w.put(cache, i, {"g": i % 3}, ttl=SHORT)
    time.sleep(SHORT + 0.05)
    st.put(plain, 1, 1)
    assert _stored_rows(st, cache) == 250 - lmshard.store.WRITE_EXPIRE_STEP
    assert st.count(cache) == 0 and st.count(cache, start=0, end=1000) == 0
    with st.write():
        pass
    assert _stored_rows(st, cache) == 250 - 2 * lmshard.store.WRITE_EXPIRE_STEP


def test_expiry_survives_a_restart_and_purge_clears_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with lmshard.open(path, schema) as st:
        st.put(sessions, "keep", {"user": 1}, ttl=100)
        st.put(sessions, "gone", {"user": 1}, ttl=SHORT)
        before = st.ttl(sessions, "keep")
    time.sleep(SHORT + 0.05)
    with lmshard.open(path, schema) as st:
        assert st.ttl(sessions, "keep") == pytest.approx(before, abs=SHORT + 0.2)
        assert st.get(sessions, "gone") is None and st.count(sessions) == 1
        assert st.purge(sessions) == 2
        with st.read() as r:
            assert r.txn.stat(st.tables[sessions].expiry_db)["entries"] == 0
        st.put(sessions, "new", {"user": 3})
        assert st.count(sessions) == 1


def test_plain_tables_store_the_codec_bytes_alone(st: lmshard.Store) -> None:
    st.put(plain, 1, {"a": 1})
    st.put(cache, 1, {"g": 1})
    with st.read() as r:
        assert r.txn.get((1).to_bytes(8, "big"), db=st.tables[plain].db) == \
            plain.value.dumps({"a": 1})
        stored = r.txn.get((1).to_bytes(8, "big"), db=st.tables[cache].db)
    assert stored[:EXPIRY_SIZE] == NO_EXPIRY and expiry_of(stored) == 0
    assert st.tables[plain].expiry_db is None and not st.tables[plain].expiring
    with st.env.begin() as txn:  # the main database lists the named ones
        names = {bytes(k) for k, _ in txn.cursor()}
    assert plain.expiry_db_name not in names and cache.expiry_db_name in names


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), "60", True, None])
def test_bad_ttls_are_refused_at_the_call(st: lmshard.Store, bad: object) -> None:
    if bad is None:
        return  # None is "the table's default", not bad
    with pytest.raises(TTLError):
        st.put(sessions, "x", {"user": 1}, ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(TTLError), st.batch() as b:
        b.put(sessions, "x", {"user": 1}, ttl=bad)  # type: ignore[arg-type]
    assert st.get(sessions, "x") is None


def test_ttl_on_a_table_without_one_is_refused(st: lmshard.Store) -> None:
    with pytest.raises(TTLError):
        st.put(plain, 1, 1, ttl=5)
    with pytest.raises(TTLError):
        st.ttl(plain, 1)
    with pytest.raises(TTLError):
        st.persist(plain, 1)
    assert st.get(plain, 1) is None


def test_declarations_that_cannot_hold_are_refused(tmp_path: Path) -> None:
    s = lmshard.Schema("decl")
    for n, bad in enumerate((-5, "1h", float("nan"), True)):
        with pytest.raises(SchemaError):
            s.table(f"t{n}", table_id=f"00000000-0000-4000-8000-00000000000{n}",
                    ttl=bad)  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match="cannot carry an expiry"):
        s.table("arrays", table_id="00000000-0000-4000-8000-0000000000aa", value="numpy", ttl=60)

    def one(ttl: float | None) -> lmshard.Schema:
        sc = lmshard.Schema("decl")
        sc.table("t", table_id="00000000-0000-4000-8000-0000000000bb", ttl=ttl)
        return sc

    path = tmp_path / "d"
    lmshard.open(path, one(None)).close()
    with pytest.raises(SchemaMismatch, match="without ttl"):
        lmshard.open(path, one(60))
    path2 = tmp_path / "e"
    lmshard.open(path2, one(60)).close()
    with pytest.raises(SchemaMismatch, match="with ttl"):
        lmshard.open(path2, one(None))
    lmshard.open(path2, one(0)).close()  # another number keeps the layout: allowed
