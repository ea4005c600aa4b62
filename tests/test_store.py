"""The embedded store's data API against real LMDB files."""

from __future__ import annotations

import logging
import os
import time
import uuid

import pytest

import lmshard
from tests.conftest import COUNTERS_ID, USERS_ID, make_schema, uid, user


def test_put_get_exists_delete(store: lmshard.Store) -> None:
    store.put("users", uid(1), user("a@x.org"))
    assert store.get("users", uid(1)) == user("a@x.org")
    assert store.exists("users", uid(1))
    assert store.get("users", uid(2)) is None
    assert store.get("users", uid(2), default="nope") == "nope"
    assert not store.exists("users", uid(2))
    assert store.delete("users", uid(1)) is True
    assert store.delete("users", uid(1)) is False
    assert store.get("users", uid(1)) is None


def test_table_object_and_name_are_interchangeable(store: lmshard.Store) -> None:
    users = store.schema["users"]
    store.put(users, uid(1), user("a@x.org"))
    assert store.get("users", uid(1)) == store.get(users, uid(1))
    with pytest.raises(lmshard.UnknownTable, match="known tables"):
        store.get("nosuch", 1)


def test_get_many_keeps_order_and_marks_missing(store: lmshard.Store) -> None:
    for i in (1, 3):
        store.put("blobs", i, b"v%d" % i)
    assert store.get_many("blobs", [3, 2, 1]) == [b"v3", None, b"v1"]


def test_batch_is_atomic(store: lmshard.Store) -> None:
    with store.batch() as b:
        b.put("blobs", 1, b"one")
        b.put("blobs", 2, b"two")
    assert store.count("blobs") == 2
    with pytest.raises(RuntimeError), store.batch() as b:
        b.put("blobs", 3, b"three")
        b.delete("blobs", 1)
        raise RuntimeError("boom")
    assert store.get_many("blobs", [1, 2, 3]) == [b"one", b"two", None]


def test_scan_ranges(store: lmshard.Store) -> None:
    for i in range(0, 20):
        store.put("blobs", i, b"%d" % i)
    keys = lambda **kw: [k for k, _ in store.scan("blobs", **kw)]  # noqa: E731
    assert keys() == list(range(20))
    assert keys(start=0, end=3) == [0, 1, 2]  # a key of 0 is a bound, not "no bound"
    assert keys(start=5, end=8) == [5, 6, 7]
    assert keys(start=17) == [17, 18, 19]
    assert keys(end=2) == [0, 1]
    assert keys(reverse=True, limit=3) == [19, 18, 17]
    assert keys(start=5, end=8, reverse=True) == [7, 6, 5]
    assert keys(start=30) == []
    assert keys(limit=0) == []
    assert [v for _, v in store.scan("blobs", start=3, limit=2)] == [b"3", b"4"]


def test_scan_tuple_prefix_and_count(store: lmshard.Store) -> None:
    for series in ("cpu", "cpu2", "mem"):
        for ts in (-5, 0, 7, 10**18):
            store.put("events", (series, ts), {"s": series, "t": ts})
    cpu = list(store.scan("events", prefix=("cpu",)))
    assert [k for k, _ in cpu] == [("cpu", -5), ("cpu", 0), ("cpu", 7), ("cpu", 10**18)]
    assert store.count("events", prefix=("cpu",)) == 4
    assert store.count("events", prefix=("cpu", 7)) == 1
    assert store.count("events") == 12
    rev = [k for k, _ in store.scan("events", prefix=("mem",), reverse=True)]
    assert rev == [("mem", 10**18), ("mem", 7), ("mem", 0), ("mem", -5)]
    between = [k for k, _ in store.scan("events", start=("cpu", 0), end=("cpu", 10))]
    assert between == [("cpu", 0), ("cpu", 7)]


def test_str_key_prefix_scan(store: lmshard.Store) -> None:
    for name in ("alpha", "alphabet", "alpine", "beta"):
        store.put("counters", name, 1)
    assert [k for k, _ in store.scan("counters", prefix="alp")] == ["alpha", "alphabet", "alpine"]
    assert store.count("counters", prefix="alpha") == 2


def test_unique_index_lookup_and_violation_changes_nothing(store: lmshard.Store) -> None:
    store.put("users", uid(1), user("a@x.org"))
    store.put("users", uid(2), user("b@x.org"))
    assert store.lookup("users", "by_email", "a@x.org") == [(uid(1), user("a@x.org"))]
    assert store.lookup("users", "by_email", "zzz@x.org") == []
    with pytest.raises(lmshard.UniqueViolation, match="a@x.org"):
        store.put("users", uid(2), user("a@x.org", age=99))
    assert store.get("users", uid(2)) == user("b@x.org")
    assert store.lookup("users", "by_email", "b@x.org") == [(uid(2), user("b@x.org"))]
    with pytest.raises(lmshard.UniqueViolation), store.batch() as b:
        b.put("users", uid(3), user("c@x.org"))
        b.put("users", uid(4), user("c@x.org"))
    assert store.get("users", uid(3)) is None
    assert store.lookup("users", "by_email", "c@x.org") == []


def test_violation_inside_explicit_write_leaves_txn_usable(store: lmshard.Store) -> None:
    store.put("users", uid(1), user("a@x.org", phone="1"))
    with store.write() as w:
        w.put("users", uid(2), user("b@x.org", phone="2"))
        with pytest.raises(lmshard.UniqueViolation):
            # the second unique index (phone) is the one violated: the email index must not
            # have been touched either
            w.put("users", uid(3), user("c@x.org", phone="1"))
        assert w.lookup("users", "by_email", "c@x.org") == []
    assert store.count("users") == 2
    assert store.lookup("users", "by_email", "c@x.org") == []


def test_overwrite_and_delete_maintain_indexes(store: lmshard.Store) -> None:
    store.put("users", uid(1), user("a@x.org", country="de", age=30))
    store.put("users", uid(1), user("new@x.org", country="fr", age=31))
    assert store.lookup("users", "by_email", "a@x.org") == []
    assert [k for k, _ in store.lookup("users", "by_email", "new@x.org")] == [uid(1)]
    assert store.lookup("users", "by_country_age", ("de", 30)) == []
    assert [k for k, _ in store.lookup("users", "by_country_age", ("fr", 31))] == [uid(1)]
    store.put("users", uid(2), user("a@x.org"))  # the old email is free again
    assert store.delete("users", uid(1))
    assert store.lookup("users", "by_email", "new@x.org") == []
    with store.read() as r:
        assert r.index_count("users", "by_email") == 1
        assert r.index_count("users", "by_country_age") == 1


def test_non_unique_composite_index_keeps_every_row(store: lmshard.Store) -> None:
    for i in range(6):
        country = "de" if i < 4 else "fr"
        store.put("users", uid(i), user(f"{i}@x.org", country=country, age=20 + i % 2))
    de20 = store.lookup("users", "by_country_age", ("de", 20))
    assert sorted(k for k, _ in de20) == [uid(0), uid(2)]
    de = store.lookup("users", "by_country_age", ("de",), prefix=True)
    assert sorted(k for k, _ in de) == [uid(i) for i in range(4)]
    assert len(store.lookup("users", "by_country_age", ("f",), prefix=True)) == 0
    by_email_prefix = store.lookup("users", "by_email", "1@", prefix=True)
    assert [k for k, _ in by_email_prefix] == [uid(1)]


def test_nullable_index_skips_none_and_delete_works(store: lmshard.Store) -> None:
    store.put("users", uid(1), user("a@x.org"))  # no phone
    store.put("users", uid(2), user("b@x.org", phone="555"))
    with store.read() as r:
        assert r.index_count("users", "by_phone") == 1
    assert store.lookup("users", "by_phone", None) == []
    assert store.delete("users", uid(1)) is True
    store.put("users", uid(2), user("b@x.org"))  # phone removed
    assert store.lookup("users", "by_phone", "555") == []


def test_non_nullable_none_is_an_error_and_writes_nothing(store: lmshard.Store) -> None:
    with pytest.raises(lmshard.NullIndexValue, match="nullable"):
        store.put("users", uid(1), {"email": None, "country": "de", "age": 1})
    assert store.count("users") == 0


def test_purge_drops_only_that_table(store: lmshard.Store) -> None:
    for i in range(5):
        store.put("users", uid(i), user(f"{i}@x.org"))
        store.put("blobs", i, b"x")
        store.put("counters", str(i), i)
    assert store.purge("users") == 5
    assert store.count("users") == 0
    assert store.lookup("users", "by_email", "1@x.org") == []
    assert store.count("blobs") == 5
    assert store.count("counters") == 5
    store.put("users", uid(1), user("1@x.org"))  # index entries were dropped too
    assert store.count("users") == 1


def test_incr_and_cas(store: lmshard.Store) -> None:
    assert store.incr("counters", "hits") == 1
    assert store.incr("counters", "hits", 41) == 42
    assert store.incr("counters", "hits", -2) == 40
    assert store.cas("counters", "k", "v1", expected=None) is True
    assert store.cas("counters", "k", "v2", expected=None) is False
    assert store.cas("counters", "k", "v2", expected="v1") is True
    assert store.get("counters", "k") == "v2"
    with store.read() as r:
        h = lmshard.value_hash(r.get_raw("counters", b"k"))
    assert store.cas("counters", "k", "v3", expected_hash=h) is True
    assert store.cas("counters", "k", "v4", expected_hash=h) is False
    with pytest.raises(lmshard.ConflictError), store.batch() as b:
        b.put("counters", "other", 1)
        b.cas("counters", "k", "v5", expected="wrong")
    assert store.get("counters", "other") is None
    store.put("counters", "text", "abc")
    with pytest.raises(lmshard.ConflictError, match="int"):
        store.incr("counters", "text")


def test_read_and_write_transactions(store: lmshard.Store) -> None:
    with store.write() as w:
        w.put("blobs", 1, b"a")
        assert w.get("blobs", 1) == b"a"  # a write txn reads its own writes
        with store.read() as r:
            assert r.get("blobs", 1) is None  # not committed yet
    with store.read() as r:
        assert r.get("blobs", 1) == b"a"
        assert r.txn_id >= 1


def test_stats_and_marshal(store: lmshard.Store) -> None:
    store.put("users", uid(7), user("m@x.org", phone="1"))
    s = store.stats()
    assert s["tables"]["users"]["rows"] == 1
    assert s["tables"]["users"]["table_id"] == USERS_ID
    assert s["tables"]["users"]["bytes"] > 0
    assert s["tables"]["users"]["indexes"]["by_email"]["entries"] == 1
    assert s["env"]["map_used"] <= s["env"]["map_size"]
    assert s["env"]["last_txnid"] >= 2
    m = store.marshal("users", uid(7))
    assert m is not None
    assert m["key"] == str(uid(7))
    assert m["value"]["email"] == "m@x.org"
    assert m["indexes"] == {"by_email": "m@x.org", "by_country_age": ["de", 30], "by_phone": "1"}
    import json

    json.dumps(m)
    assert store.marshal("users", uid(8)) is None


def test_renamed_table_keeps_its_data(store_path, schema) -> None:  # type: ignore[no-untyped-def]
    with lmshard.open(store_path, schema) as s:
        s.put("counters", "a", 1)
    renamed = lmshard.Schema("test")
    renamed.table("tallies", table_id=COUNTERS_ID, key="str", value="cbor")
    with lmshard.open(store_path, renamed) as s:
        assert s.get("tallies", "a") == 1


def test_changed_key_kind_is_refused(store_path, schema) -> None:  # type: ignore[no-untyped-def]
    with lmshard.open(store_path, schema) as s:
        s.put("counters", "a", 1)
    changed = lmshard.Schema("test")
    changed.table("counters", table_id=COUNTERS_ID, key="uint64", value="cbor")
    with pytest.raises(lmshard.SchemaMismatch, match="key"):
        lmshard.open(store_path, changed)


def test_other_schema_name_is_refused(store_path, schema) -> None:  # type: ignore[no-untyped-def]
    lmshard.open(store_path, schema).close()
    with pytest.raises(lmshard.SchemaMismatch, match="belongs to schema"):
        lmshard.open(store_path, lmshard.Schema("other"))


def test_index_added_later_is_built_from_existing_rows(store_path) -> None:  # type: ignore[no-untyped-def]
    s1 = lmshard.Schema("test")
    s1.table("users", table_id=USERS_ID, key="uuid", value="cbor")
    with lmshard.open(store_path, s1) as s:
        for i in range(50):
            s.put("users", uid(i), user(f"{i}@x.org", age=i))
    s2 = lmshard.Schema("test")
    t = s2.table("users", table_id=USERS_ID, key="uuid", value="cbor")
    t.index("by_age", lambda v: v["age"])
    with lmshard.open(store_path, s2) as s:
        assert [k for k, _ in s.lookup("users", "by_age", 17)] == [uid(17)]


def test_migration_runs_once_in_one_transaction(store_path) -> None:  # type: ignore[no-untyped-def]
    v1 = lmshard.Schema("test", version=1)
    v1.table("counters", table_id=COUNTERS_ID, key="str", value="cbor")
    with lmshard.open(store_path, v1) as s:
        s.put("counters", "a", 1)
    calls = []
    v2 = lmshard.Schema("test", version=2)
    v2.table("counters", table_id=COUNTERS_ID, key="str", value="cbor")

    @v2.migration(1)
    def double(w: lmshard.WriteTxn) -> None:
        calls.append(1)
        for k, v in list(w.scan("counters")):
            w.put("counters", k, v * 2)

    with lmshard.open(store_path, v2) as s:
        assert s.get("counters", "a") == 2
    with lmshard.open(store_path, v2) as s:
        assert s.get("counters", "a") == 2
    assert calls == [1]
    with pytest.raises(lmshard.SchemaMismatch, match="newer"):
        lmshard.open(store_path, v1)


def test_map_grows_then_store_full_keeps_earlier_data(store_path, schema) -> None:  # type: ignore[no-untyped-def]
    with lmshard.open(store_path, schema, map_size=256 * 1024, max_map_size=2 * 2**20) as s:
        blob = os.urandom(16 * 1024)
        written = 0
        with pytest.raises(lmshard.StoreFull, match="max_map_size"):
            for i in range(10_000):
                with s.batch() as b:
                    for j in range(4):
                        b.put("blobs", i * 4 + j, blob)
                written = (i + 1) * 4
        assert written > 16  # it grew past the initial 256 KiB before hitting the cap
        assert s.stats()["env"]["map_size"] == 2 * 2**20
        assert s.count("blobs") == written
        assert s.get("blobs", written - 1) == blob
        assert s.get("blobs", written) is None


def test_readonly_store_refuses_writes(store_path, schema) -> None:  # type: ignore[no-untyped-def]
    with lmshard.open(store_path, schema) as s:
        s.put("blobs", 1, b"x")
    with lmshard.open(store_path, schema, readonly=True) as r:
        assert r.get("blobs", 1) == b"x"
        with pytest.raises(lmshard.ReadOnlyError):
            r.put("blobs", 2, b"y")


def test_readonly_open_of_missing_store_is_clear(tmp_path, schema) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(lmshard.Error, match="no lmshard store"):
        lmshard.open(tmp_path / "nothing", schema, readonly=True)


def test_slow_write_transaction_logs_a_warning(store, caplog) -> None:  # type: ignore[no-untyped-def]
    store.slow_txn_warning = 0.05
    with caplog.at_level(logging.WARNING, logger="lmshard.store"), store.write() as w:
        w.put("blobs", 1, b"x")
        time.sleep(0.1)
    assert any("held open" in r.message for r in caplog.records)


def true_in_forked_child(check) -> bool:  # type: ignore[no-untyped-def]
    """Run ``check()`` in a forked child; whether it returned True there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"1" if check() else b"0")
        finally:
            os._exit(0)
    os.close(w)
    ok = os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    return ok


def test_store_reopens_after_fork(store) -> None:  # type: ignore[no-untyped-def]
    store.put("blobs", 1, b"parent")
    store.get("blobs", 1)
    held = store.env.begin()  # a parent read txn alive across the fork keeps its reader slot

    def child() -> bool:  # the inherited env must not be used; the store reopens it
        store.put("blobs", 2, b"child")
        return bool(store.get("blobs", 1) == b"parent" and store.get("blobs", 2) == b"child")

    assert true_in_forked_child(child)
    assert f"{os.getpid()} " in store.env.readers()  # the child did not clear our slots
    assert held.get(b"x") is None
    held.abort()
    assert store.get("blobs", 2) == b"child"


def test_get_is_the_first_use_after_fork(store) -> None:  # type: ignore[no-untyped-def]
    store.put("blobs", 1, b"parent")
    # get() reopens the store in the child and reads with the child's handles
    assert true_in_forked_child(lambda: store.get("blobs", 1) == b"parent")


def test_schema_declaration_errors() -> None:
    s = lmshard.Schema("x")
    s.table("a", table_id=USERS_ID)
    with pytest.raises(lmshard.SchemaError, match="share the table_id"):
        s.table("b", table_id=USERS_ID)
    with pytest.raises(lmshard.SchemaError, match="already has a table"):
        s.table("a", table_id=uuid.uuid4())
    with pytest.raises(lmshard.SchemaError, match="not a UUID"):
        s.table("c", table_id="not-a-uuid")
    with pytest.raises(lmshard.SchemaError, match="key kind|kinds"):
        s.table("d", table_id=uuid.uuid4(), key="float")
    t = s["a"]
    t.index("i", lambda v: v)
    with pytest.raises(lmshard.SchemaError, match="already has an index"):
        t.index("i", lambda v: v)
    with pytest.raises(lmshard.UnknownTable):
        s["zzz"]


def test_unknown_index_is_clear(store: lmshard.Store) -> None:
    with pytest.raises(lmshard.UnknownIndex, match="by_email"):
        store.lookup("users", "by_mail", "x")


def test_make_schema_is_reusable() -> None:
    assert make_schema().tables.keys() == make_schema().tables.keys()


def test_transactions_used_after_their_block_say_so(store: lmshard.Store) -> None:
    with store.read() as r:
        pass
    with pytest.raises(lmshard.TransactionError, match="ended"):
        r.get("blobs", 1)
    with store.write() as w:
        w.put("blobs", 1, b"x")
    with pytest.raises(lmshard.TransactionError, match="ended"):
        w.get("blobs", 1)


def test_unique_indexes_that_shards_cannot_enforce_are_refused() -> None:
    s = lmshard.Schema("x")
    orders = s.table("orders", table_id=uuid.uuid4(), key=("uuid", "uint64"),
                     shard_key=lambda k: k[0])
    with pytest.raises(lmshard.SchemaError, match="cannot be enforced"):
        orders.index("by_number", lambda v: (v["user"], v["number"]), unique=True)
    orders.index("by_number", lambda v: (v["user"], v["number"]), unique=True,
                 shard_key=lambda v: v["user"])
    s.check_sharded(4)  # derived from the shard key: fine
    plain = s.table("plain", table_id=uuid.uuid4(), key="uint64")
    plain.index("by_email", lambda v: v["email"], unique=True)
    s.check_sharded(1)  # one shard enforces everything
    with pytest.raises(lmshard.SchemaError, match=r"plain\.by_email cannot be enforced over 4"):
        s.check_sharded(4)


def test_index_shard_key_is_checked_on_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = lmshard.Schema("x")
    orders = s.table("orders", table_id=uuid.uuid4(), key=("uuid", "uint64"),
                     shard_key=lambda k: k[0])
    orders.index("by_number", lambda v: (v["user"], v["number"]), unique=True,
                 shard_key=lambda v: v["user"])
    u = uuid.uuid4()
    with lmshard.open(tmp_path / "s", s) as store:
        store.put("orders", (u, 1), {"user": u, "number": 7})
        with pytest.raises(lmshard.KeyEncodingError, match="shard_key"):
            store.put("orders", (u, 2), {"user": uuid.uuid4(), "number": 8})
        assert store.count("orders") == 1
