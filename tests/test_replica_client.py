"""The client after a failover, and reads on a replica host, against real owner processes.

Until the replica process (``lmshardd replica``) and ``lmshard failover`` land, a second real
owner of the same shard, serving copy "b" (``ShardOwner(config, 0, member="b")`` over a copy of
the home's files, client records included, as a replica has them), stands in for a replica
promoted to primary; and a copy directory whose meta records the test writes stands in for a
replica that lags and then catches up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

from lmshard.copies import ping_copies
from lmshard.errors import DeadlineExceeded, ReplicaBehind, ShardUnavailable
from lmshard.members import PRIMARY, REPLICA, MemberState, state_records
from lmshard.protocol import OP_INCR, PING, WRITE, incr_delta, op, pack_request, unpack_frame
from lmshard.store_meta import MAX_DBS, META_DB
from tests import schemas
from tests.cluster import Cluster, env_for_children, wait_for

OWNER_OF_COPY = """
import sys
from lmshard.config import load_config
from lmshardd.owner import ShardOwner

owner = ShardOwner(load_config(sys.argv[1]), int(sys.argv[2]), member=sys.argv[3])
owner.install_signal_handlers()
owner.load_channels()
owner.bind()
owner.serve_forever()
"""
"""Serves one copy of one shard as its owner (the promoted replica's last step)."""

NOT_PRIMARY_COPY = """
import json, sys
import zmq
from lmshard.errors import NotPrimary
from lmshard.protocol import PING, pack_error, pack_reply, unpack_request

endpoint, seen, names = sys.argv[1], sys.argv[2], sys.argv[3] or None
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(endpoint)
with open(seen, "a") as out:
    while True:
        ident, frame = sock.recv_multipart()
        code, cid, seq, body, epoch, _version = unpack_request(frame)
        out.write(json.dumps([code, epoch]) + "\\n")
        out.flush()
        if code == PING.code:
            reply = pack_reply(seq, 0, {"member": "home", "role": "replica", "epoch": 2,
                                        "primary": "b"})
        else:
            reply = pack_error(seq, NotPrimary("shard 0: not primary", primary=names, epoch=2))
        sock.send_multipart([ident, reply])
"""
"""Answers at the home's endpoint as a copy that follows b answers: writes with NotPrimary (naming
the copy given, or none: an owner fenced off), pings with a replica's health; it writes down
(command code, epoch) of each request."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, shards=1, replica_names=["b"],
                replica_data_dir=str(tmp_path / "replicas"))
    try:
        yield c
    finally:
        c.stop()


def _start(cluster: Cluster, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
    with open(cluster.base / log_name, "ab") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env_for_children())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _copy_home_to(cluster: Cluster, name: str, state: MemberState) -> Path:
    """Copy the home's files of shard 0 (its rows and its client records) to copy ``name``'s
    directory, with ``state`` as that copy's meta records; the directory."""
    dest = cluster.config.member(0, name).dir
    dest.mkdir(parents=True)
    src = lmdb.open(str(cluster.config.shard_dir(0)), readonly=True, max_dbs=MAX_DBS)
    try:
        src.copy(str(dest))
    finally:
        src.close()
    _write_meta(dest, state_records(state))
    return dest


def _write_meta(path: Path, records: dict[bytes, bytes]) -> None:
    """Write ``records`` into the meta database of the environment at ``path``, one txn."""
    env = lmdb.open(str(path), max_dbs=MAX_DBS)
    try:
        meta = env.open_db(META_DB)
        with env.begin(write=True) as txn:
            for k, v in records.items():
                txn.put(k, v, db=meta)
    finally:
        env.close()


def _serve_copy(cluster: Cluster, name: str) -> subprocess.Popen[bytes]:
    """Start an owner of shard 0 serving copy ``name``; wait until it answers a ping."""
    proc = _start(cluster, ["-c", OWNER_OF_COPY, str(cluster.config_path), "0", name],
                  f"owner-{name}.log")
    ctx = zmq.Context()
    try:
        def up() -> bool:
            assert proc.poll() is None, (cluster.base / f"owner-{name}.log").read_text()
            return ping_copies(cluster.config, 0, [name], 0.2, ctx)[name].health is not None
        wait_for(f"copy {name} to serve", up)
    finally:
        ctx.destroy(linger=0)
    return proc


def _rows(path: Path, table: Any) -> dict[Any, Any]:
    import lmshard

    with lmshard.open(path, schemas.schema, readonly=True) as st, st.read() as r:
        return dict(r.scan(table))


PROMOTED = MemberState(role=PRIMARY, epoch=2, primary="b")
"""The meta records of copy b once promoted."""


def test_writes_move_to_the_promoted_copy_and_a_resent_batch_applies_once(
        cluster: Cluster) -> None:
    cluster.start()
    records, counters = schemas.records, schemas.counters
    with cluster.client(timeout_ms=300, retries=1, local_reads=False) as c:
        c.put(records, 1, {"name": "before"})
        # The client's next write, which the home applies but whose reply never reaches the
        # client: sent by hand under its client id and next sequence number.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(cluster.config.endpoint(0))
        kb = c.table(counters).kenc("hits")
        sock.send(pack_request(WRITE.code, c.client_id, c.owners._conn(0).seq + 1,  # noqa: SLF001
                               [op(OP_INCR, c.table(counters).tid, kb, incr_delta(5))]))
        assert sock.poll(10_000)
        assert unpack_frame(sock.recv())[1] == 0
        ctx.destroy(linger=0)
        cluster.kill(0, signal.SIGTERM)  # the home's host is gone
        _copy_home_to(cluster, "b", PROMOTED)
        b = _serve_copy(cluster, "b")
        try:
            # The client sends that write (its next sequence number): the home is gone, b is
            # primary; b answers it from the client record it has and does not apply it again.
            assert c.incr(counters, "hits", 5) == 5  # no error: it moved to b
            c.put(records, 2, {"name": "after"})
            assert c.incr(counters, "hits", 1) == 6
            assert c.owners.endpoint(0) == cluster.config.member(0, "b").endpoint
            with cluster.client(timeout_ms=300, retries=1) as c2, c2.batch() as batch:
                batch.put(records, 3, {"name": "batched"})  # a batch follows too
        finally:
            _stop(b)
    rows = _rows(cluster.config.member(0, "b").dir, records)
    assert sorted(rows) == [1, 2, 3]
    assert _rows(cluster.config.member(0, "b").dir, counters) == {"hits": 6}


@pytest.mark.parametrize("names", ["b", ""])
def test_not_primary_moves_to_the_copy_named_or_found(cluster: Cluster, names: str) -> None:
    b_dir = cluster.config.member(0, "b").dir
    b_dir.mkdir(parents=True)
    _write_meta(b_dir, state_records(PROMOTED))
    seen = cluster.base / "seen.jsonl"
    b = _serve_copy(cluster, "b")
    home = _start(cluster, ["-c", NOT_PRIMARY_COPY, cluster.config.endpoint(0), str(seen),
                            names], "home.log")
    wait_for("the home's socket", Path(cluster.config.endpoint(0)[len("ipc://"):]).exists)
    try:
        with cluster.client(timeout_ms=2000, retries=1, local_reads=False) as c:
            c.put(schemas.records, 1, {"name": "one"})
            assert c.owners.epoch(0) == 2  # learnt from the NotPrimary answer
            c.put(schemas.records, 2, {"name": "two"})
            assert c.get(schemas.records, 2)["name"] == "two"
    finally:
        _stop(b)
        _stop(home)
    asked = [json.loads(line) for line in seen.read_text().splitlines()]
    # One write; then b (no ping when the answer names it; else after pinging every copy).
    assert asked == ([[WRITE.code, 0]] if names else [[WRITE.code, 0], [PING.code, 0]]), asked
    assert sorted(_rows(b_dir, schemas.records)) == [1, 2]


def test_writer_resends_its_unacknowledged_batches_to_the_promoted_copy(
        cluster: Cluster) -> None:
    cluster.start()
    records, counters = schemas.records, schemas.counters
    with cluster.client(timeout_ms=300, retries=1, local_reads=False) as c:
        w = c.writer(batch_size=5, window=4)
        for i in range(4):
            w.put(records, i, {"name": f"u{i}"})
        w.incr(counters, "batches")
        w.flush()  # one batch, acked by the home
        os.kill(cluster.pid(0), signal.SIGSTOP)  # what is sent now is neither applied nor answered
        for n in range(3):
            for i in range(4):
                k = 100 + 10 * n + i
                w.put(records, k, {"name": f"u{k}"})
            w.incr(counters, "batches")  # the fifth op: the batch goes out
        assert len(w._streams[0].inflight) == 3  # noqa: SLF001
        cluster.kill(0, signal.SIGKILL)
        _copy_home_to(cluster, "b", PROMOTED)
        b = _serve_copy(cluster, "b")
        try:
            w.flush()  # no error: the three batches went to b, in order
            assert w.committed == 4
            w.close()
        finally:
            _stop(b)
    b_dir = cluster.config.member(0, "b").dir
    assert len(_rows(b_dir, records)) == 16
    assert _rows(b_dir, counters) == {"batches": 4}


def test_a_silent_owner_with_no_primary_elsewhere_fails_as_before(cluster: Cluster) -> None:
    cluster.start()
    with cluster.client(timeout_ms=300, retries=3, breaker_ms=0, local_reads=False) as c:
        c.put(schemas.records, 1, {"name": "one"})
        os.kill(cluster.pid(0), signal.SIGSTOP)  # silent; copy b does not run
        try:
            with pytest.raises(DeadlineExceeded), c.deadline(0.2):
                c.put(schemas.records, 2, {"name": "two"})
            with pytest.raises(ShardUnavailable, match="did not answer within 300 ms, 4 attempts"):
                c.put(schemas.records, 3, {"name": "three"})
        finally:
            cluster.kill(0, signal.SIGKILL)
        assert c.owners.endpoint(0) == cluster.config.endpoint(0)  # nowhere to move to


def test_a_silent_owner_is_left_for_the_primary_after_one_timeout(cluster: Cluster) -> None:
    """A host that dies leaves its owner silent (no socket file goes away across hosts): the
    client asks the copies after the first unanswered attempt, not after every retry."""
    cluster.start()
    with cluster.client(timeout_ms=300, retries=5, breaker_ms=0, local_reads=False) as c:
        c.put(schemas.records, 1, {"name": "one"})
        os.kill(cluster.pid(0), signal.SIGSTOP)  # the home stays silent
        _copy_home_to(cluster, "b", PROMOTED)
        b = _serve_copy(cluster, "b")
        try:
            before = c.counters()["timeouts"]
            c.put(schemas.records, 2, {"name": "two"})
            assert c.counters()["timeouts"] - before == 1  # one attempt, then the search
            assert c.owners.endpoint(0) == cluster.config.member(0, "b").endpoint
        finally:
            _stop(b)
            cluster.kill(0, signal.SIGKILL)


def test_async_client_follows_the_shard_to_the_promoted_copy(cluster: Cluster) -> None:
    import lmshard.aio

    cluster.start()
    records, counters = schemas.records, schemas.counters

    async def main() -> None:
        async with lmshard.aio.connect(cluster.config, timeout_ms=300, retries=1,
                                       local_reads=False) as db:
            await db.put(records, 1, {"name": "before"})
            cluster.kill(0, signal.SIGTERM)
            _copy_home_to(cluster, "b", PROMOTED)
            b = _serve_copy(cluster, "b")
            try:
                # Many writes in flight when the shard moves: each is sent to b once more
                # under its own lane and number, and applied there once.
                await asyncio.gather(*(db.put(records, k, {"name": f"r{k}"})
                                       for k in range(2, 12)),
                                     *(db.incr(counters, "hits") for _ in range(10)))
                assert await db.get(records, 11) == {"name": "r11"}
            finally:
                _stop(b)

    asyncio.run(main())
    b_dir = cluster.config.member(0, "b").dir
    assert sorted(_rows(b_dir, records)) == list(range(1, 12))
    assert _rows(b_dir, counters) == {"hits": 10}


# -- reads on a replica host -----------------------------------------------------------------


def test_replica_host_reads_wait_for_the_clients_own_write(cluster: Cluster) -> None:
    cluster.start()
    records = schemas.records
    with cluster.client() as c:
        c.put(records, 1, {"name": "old"})
    b_dir = _copy_home_to(cluster, "b", MemberState(role=REPLICA, epoch=1, primary="home",
                                                    applied=1, applied_epoch=1))
    _write_rows(b_dir, {2: "only-on-b"})
    replica_host = dataclasses.replace(cluster.config, replica_local="b", replica_wait=0.3)
    with cluster.client() as home_host, _connect(replica_host) as c:
        # Local reads open b's copy; with no write of this client, they wait for nothing.
        assert c.get(records, 2)["name"] == "only-on-b"
        assert home_host.get(records, 2) is None
        with c.batch() as batch:
            batch.put(records, 1, {"name": "new"})
        txn = batch.txn_ids[0]
        t = time.monotonic()
        with pytest.raises(ReplicaBehind) as err:
            c.get(records, 1)
        assert time.monotonic() - t >= 0.3
        assert f"txn {txn}" in str(err.value) and "shard 0" in str(err.value), err.value
        with pytest.raises(ReplicaBehind):
            c.get_many(records, [1, 2])
        with pytest.raises(ReplicaBehind):
            list(c.scan(records))

    # Another client writes; the copy applies both writes (the rows and replica_applied in one
    # txn) while that client's read waits: the read gets through and sees its write.
    with _connect(dataclasses.replace(replica_host, replica_wait=30.0)) as d:
        with d.batch() as batch:
            batch.put(records, 3, {"name": "three"})
        catch_up = threading.Timer(0.3, _write_rows, (b_dir, {1: "new", 3: "three"},
                                                      batch.txn_ids[0]))
        catch_up.start()
        t = time.monotonic()
        assert d.get(records, 3)["name"] == "three"
        assert time.monotonic() - t >= 0.2
        catch_up.join()
        assert d.get_many(records, [1, 2]) == [{"name": "new"}, {"name": "only-on-b"}]

    # The async client waits the same way, without holding up its event loop.
    asyncio.run(_async_reads_wait(cluster, replica_host, b_dir))


async def _async_reads_wait(cluster: Cluster, replica_host: Any, b_dir: Path) -> None:
    import lmshard.aio

    records = schemas.records
    async with lmshard.aio.connect(replica_host, schemas.schema) as db:
        await db.put(records, 4, {"name": "four"})
        with pytest.raises(ReplicaBehind):
            await db.get(records, 4)
        with pytest.raises(ReplicaBehind):
            await db.get_many(records, [4])
    slow = dataclasses.replace(replica_host, replica_wait=30.0)
    async with lmshard.aio.connect(slow, schemas.schema) as db:
        await db.put(records, 5, {"name": "five"})
        with cluster.client() as home_host:
            last = home_host.ping(0)["txn_id"]
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        catch_up = threading.Timer(0.3, _write_rows, (b_dir, {4: "four", 5: "five"}, last))
        catch_up.start()
        assert await db.get(records, 5) == {"name": "five"}
        catch_up.join()
        ticker.cancel()
        assert ticks >= 10  # the loop ran while the read waited
        assert await db.get_many(records, [4, 1]) == [{"name": "four"}, {"name": "new"}]


def _connect(config: Any) -> Any:
    import lmshard

    return lmshard.connect(config, schemas.schema)


def _write_rows(path: Path, rows: dict[int, str], applied: int | None = None) -> None:
    """In another process (as the replica's own), write ``rows`` (key -> name) into the
    records table of the copy at ``path`` and, when given, record ``applied`` as its
    replica_applied, in one write transaction (as a replica applies one primary transaction)."""
    subprocess.run([sys.executable, "-c", APPLY, str(path), json.dumps(rows), str(applied)],
                   check=True, env=env_for_children(), timeout=60)


APPLY = """
import json, sys
import lmshard
from lmshard.members import META_REPLICA_APPLIED
from lmshard.store_meta import META_DB
from tests import schemas

path, rows, applied = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with lmshard.open(path, schemas.schema) as st, st.write() as w:
    for k, name in rows.items():
        w.put(schemas.records, int(k), {"name": name})
    if applied != "None":
        meta = st.env.open_db(META_DB, txn=w.txn)
        w.txn.put(META_REPLICA_APPLIED, applied.encode(), db=meta)
"""
