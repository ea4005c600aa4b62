"""The client against real shard owner processes: the data API, routing, errors."""

from __future__ import annotations

import uuid

import pytest

import lmshard
from tests.cluster import Cluster


def test_put_get_delete_incr_cas_through_owners(cluster: Cluster) -> None:
    with cluster.client() as c:
        uid = uuid.uuid4()
        c.put("users", uid, {"email": "a@x.org", "n": 1})
        assert c.get("users", uid) == {"email": "a@x.org", "n": 1}  # read-your-writes, locally
        assert c.exists("users", uid)
        assert c.lookup("users", "by_email", "a@x.org") == [(uid, {"email": "a@x.org", "n": 1})]
        assert c.incr("counters", "hits") == 1
        assert c.incr("counters", "hits", 9) == 10
        assert c.cas("counters", "k", "v1") is True
        assert c.cas("counters", "k", "v2") is False
        assert c.cas("counters", "k", "v2", expected="v1") is True
        h = c.get_hash("counters", "k")
        assert h is not None and c.cas("counters", "k", "v3", expected_hash=h) is True
        assert c.get("counters", "k") == "v3"
        assert c.delete("users", uid) is True
        assert c.delete("users", uid) is False
        assert c.get("users", uid) is None
        assert c.lookup("users", "by_email", "a@x.org") == []


def test_rows_spread_over_shards_and_scans_merge_in_key_order(cluster: Cluster) -> None:
    with cluster.client() as c:
        with c.batch() as b:
            for i in range(400):
                b.put("blobs", i, b"%d" % i)
        assert len(b.txn_ids) == 4  # the batch was split over every shard
        per_shard = [c.local_store(s).count("blobs") for s in range(4)]  # type: ignore[union-attr]
        assert sum(per_shard) == 400 and min(per_shard) > 50
        assert [k for k, _ in c.scan("blobs")] == list(range(400))
        assert [k for k, _ in c.scan("blobs", start=10, end=15)] == [10, 11, 12, 13, 14]
        assert [k for k, _ in c.scan("blobs", reverse=True, limit=3)] == [399, 398, 397]
        assert c.count("blobs") == 400
        assert c.get_many("blobs", [5, 1000, 7]) == [b"5", None, b"7"]


def test_shard_key_keeps_a_series_on_one_shard(cluster: Cluster) -> None:
    with cluster.client() as c:
        with c.batch() as b:
            for series in ("cpu", "mem", "disk"):
                for t in range(50):
                    b.put("events", (series, t), {"v": t})
        assert c.count("events", prefix=("cpu",)) == 50
        local = [c.local_store(s) for s in range(4)]
        holders = [s for s, st in enumerate(local) if st and st.count("events", prefix=("cpu",))]
        assert len(holders) == 1
        first = [k for k, _ in c.scan("events", prefix=("mem",), limit=2)]
        assert first == [("mem", 0), ("mem", 1)]


def test_remote_reads_match_local_reads(cluster: Cluster) -> None:
    with cluster.client() as c, cluster.client(local_reads=False) as r:
        with c.batch() as b:
            for i in range(3000):
                b.put("items", i, {"group": i % 7, "i": i})
        assert r.get("items", 5) == c.get("items", 5)
        assert r.get_many("items", [1, 2, 99999]) == c.get_many("items", [1, 2, 99999])
        assert list(r.scan("items")) == list(c.scan("items"))  # pages of 1,000 over the wire
        assert r.count("items") == c.count("items") == 3000
        assert r.count("items", start=100, end=200) == 100
        assert r.lookup("items", "by_group", 3) == c.lookup("items", "by_group", 3)
        assert len(r.lookup("items", "by_group", 3)) == len(range(3, 3000, 7))
        assert r.stats()["client"]["remote_reads"] > 0
        assert c.stats()["client"]["remote_reads"] == 0  # every read was local


def test_unique_violation_fails_the_batch_alone(cluster: Cluster) -> None:
    with cluster.client() as c:
        a, b2 = uuid.uuid4(), uuid.uuid4()
        c.put("users", a, {"email": "dup@x.org"})
        with pytest.raises(lmshard.UniqueViolation), c.batch() as b:
            b.put("users", b2, {"email": "other@x.org"})
            b.put("users", uuid.uuid4(), {"email": "dup@x.org"})
        assert c.get("users", b2) is None  # the whole (single-shard) batch was left out


def test_batch_over_shards_reports_partial_outcome(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.put("counters", "taken", "x")
        with pytest.raises(lmshard.BatchPartiallyApplied) as info, c.batch() as b:
            for i in range(40):
                b.put("blobs", i, b"ok")
            b.cas("counters", "taken", "y")  # expects absent: fails its shard's part
        err = info.value
        assert len(err.failed) == 1 and len(err.committed) >= 2
        (failed_shard, exc), = err.failed.items()
        assert isinstance(exc, lmshard.ConflictError)
        committed_rows = sum(1 for i in range(40) if c.get("blobs", i) == b"ok")
        assert 0 < committed_rows < 40


def test_bad_input_is_refused_before_sending(cluster: Cluster) -> None:
    with cluster.client() as c:
        with pytest.raises(lmshard.KeyEncodingError):
            c.put("blobs", -1, b"x")
        with pytest.raises(lmshard.CodecError):
            c.put("counters", "k", object())
        with pytest.raises(lmshard.UnknownTable):
            c.put("nope", 1, 1)
        with pytest.raises(lmshard.KeyEncodingError), c.batch() as b:
            b.put("blobs", 1, b"fine")
            b.put("blobs", "not an int", b"x")
        assert c.get("blobs", 1) is None  # nothing of the failed batch was sent


def test_stopped_shard_is_named_in_the_error(cluster: Cluster) -> None:
    cluster.kill(2)
    with cluster.client(timeout_ms=200, retries=1) as c:
        key = next(i for i in range(1000) if c.slot_map.shard_of(i.to_bytes(8, "big")) == 2)
        with pytest.raises(lmshard.ShardUnavailable, match="shard 2 at ipc://"):
            c.put("blobs", key, b"x")
        stats = c.stats()
        assert stats["client"]["retries"] >= 1
        assert "shard 2 at ipc://" in stats["shards"][2]["error"]  # the others still answer:
        assert all(stats["shards"][s]["shard"] == s for s in (0, 1, 3))


def test_owner_refuses_another_shards_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmshardd.owner import ShardOwner

    cl = Cluster(tmp_path, shards=2)
    ShardOwner(cl.config, 0).close()
    (cl.config.data_dir / "shard-00").rename(cl.config.data_dir / "shard-01")
    with pytest.raises(lmshard.SchemaMismatch, match="holds shard 0"):
        ShardOwner(cl.config, 1)


def test_client_counters_add_up_over_threads_including_finished_ones(cluster: Cluster) -> None:
    import threading

    with cluster.client() as c:
        def work(base: int) -> None:
            for i in range(300):
                c.put("blobs", base + i, b"x")
            with c.batch() as b:
                for i in range(300, 400):
                    b.put("blobs", base + i, b"y")

        for wave in range(2):  # the first wave's threads are gone when the second one counts
            threads = [threading.Thread(target=work, args=((wave * 8 + t) * 1000,))
                       for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        total = c.counters()
        assert total["ops_sent"] == 16 * 400
        assert total["batches_sent"] >= 16 * 301  # one per put, one per shard per batch
        assert c.stats()["client"]["ops_sent"] == 16 * 400
        assert c.count("blobs") == 16 * 400


def test_int_shard_key_keeps_a_series_together_and_its_scans_on_one_shard(
        cluster: Cluster) -> None:
    series = [f"s{i}" for i in range(12)]
    with cluster.client() as c:
        with c.batch() as b:
            for s in series:
                for t in range(50):
                    b.put("readings", (s, t), {"v": t})
        homes = {}
        for s in series:
            found = [sh for sh in range(4) if c.local_store(sh).count("readings", prefix=(s,)) > 0]
            assert len(found) == 1  # the whole series on one shard
            homes[s] = found[0]
        assert len(set(homes.values())) > 1  # and the series spread over shards
    # Stop every owner but one: remote scans and counts of its series still answer, because
    # they go to that shard alone (a fan-out would wait for the stopped ones and fail).
    keep = homes["s0"]
    for sh in range(4):
        if sh != keep:
            cluster.kill(sh)
    with cluster.client(local_reads=False, timeout_ms=300, retries=0) as r:
        mine = [s for s in series if homes[s] == keep]
        for s in mine:
            rows = list(r.scan("readings", prefix=(s,)))
            assert rows == [((s, t), {"v": t}) for t in range(50)]
            assert r.count("readings", prefix=s) == 50  # a scalar prefix is a 1-tuple
            assert list(r.scan("readings", prefix=(s, 7))) == [((s, 7), {"v": 7})]
        with pytest.raises(lmshard.ShardUnavailable):
            list(r.scan("readings"))  # no prefix: every shard


def test_int_shard_key_declarations_are_checked() -> None:
    schema = lmshard.Schema("x")
    tid = iter(f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 9))
    for key, n in ((("str", "uint64"), 0), (("str", "uint64"), 2), ("str", 1), (("str",), 1)):
        with pytest.raises(lmshard.SchemaError, match="shard_key"):
            schema.table(f"t{n}{key}", table_id=next(tid), key=key, shard_key=n)
    with pytest.raises(lmshard.SchemaError, match="function of the key or an int"):
        schema.table("bad", table_id=next(tid), key=("str", "uint64"),
                      shard_key="first")  # type: ignore[arg-type]
    t = schema.table("ok", table_id=next(tid), key=("str", "str", "uint64"), shard_key=2)
    assert t.shard_prefix == 2 and t.shard_key is not None
    assert t.shard_key(("a", "b", 3)) == ("a", "b")


def test_owner_refuses_a_changed_table_placement(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmshardd.owner import ShardOwner

    def declared(**placement: object) -> lmshard.Schema:
        s = lmshard.Schema("fleet")
        s.table("t", table_id="00000000-0000-4000-8000-0000000000aa", key=("str", "uint64"),
                **placement)  # type: ignore[arg-type]
        return s

    cl = Cluster(tmp_path, shards=2)
    ShardOwner(cl.config, 0, schema=declared(shard_key=1)).close()
    ShardOwner(cl.config, 0, schema=declared(shard_key=1)).close()  # unchanged: fine
    for other in ({"shard_key": lambda k: k[0]}, {}, {"pinned": True}):
        with pytest.raises(lmshard.SchemaMismatch, match="placed on shards by shard_key=1"):
            ShardOwner(cl.config, 0, schema=declared(**other))
    ShardOwner(cl.config, 0, schema=declared(shard_key=1)).close()  # nothing was recorded


def test_client_local_reads_after_fork_use_the_childs_own_environment(cluster: Cluster) -> None:
    import os

    with cluster.client() as c:
        c.put("records", 1, {"v": "parent"})
        assert c.get("records", 1) == {"v": "parent"}  # this process's handles are cached
        records = c.table("records")
        shard = records.shard(1, records.kenc(1))
        parent_env = c.local_store(shard).env  # type: ignore[union-attr]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                c.put("records", 2, {"v": "child"})
                ok = (c.get("records", 1) == {"v": "parent"}
                      and c.get("records", 2) == {"v": "child"}
                      and c.local_store(shard).env is not parent_env  # type: ignore[union-attr]
                      # the get went through the child's environment, not the inherited one
                      # (whose reader slots would carry the parent's pid)
                      and records.local[shard][0]  # type: ignore[index]
                      is c.local_store(shard).env)  # type: ignore[union-attr]
                os.write(w, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert c.get("records", 2) == {"v": "child"}
        assert f"{os.getpid()} " in parent_env.readers()  # the child left our slot alone
