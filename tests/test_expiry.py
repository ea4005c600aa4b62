"""The owner forgets client records nobody can retry any more, and only those."""

from __future__ import annotations

import time
from pathlib import Path

import lmdb
import msgpack

from lmshardd import expiry
from lmshardd.owner import CLIENTS_DB
from tests.cluster import Cluster


def _env(tmp_path: Path) -> tuple[lmdb.Environment, object]:
    env = lmdb.open(str(tmp_path / "env"), max_dbs=4, map_size=1 << 26)
    return env, env.open_db(CLIENTS_DB)


def test_sweep_deletes_expired_records_stamps_old_ones_and_keeps_the_rest(
        tmp_path: Path) -> None:
    env, db = _env(tmp_path)
    now = time.time()
    ttl = 100.0
    recs = {}
    with env.begin(write=True, db=db) as txn:
        for i in range(2500):
            cid = i.to_bytes(16, "big")
            if i % 5 == 0:
                rec = [1, 0, [7, 3]]  # written before records carried a time
            elif i % 5 == 1:
                rec = [1, 0, [7, 3], [], 5]  # pipelined stream, older replies, old
            else:
                rec = [i, 0, [7, 3], [], int(now - ttl) + (1 if i % 2 else -50)]
            recs[cid] = rec
            txn.put(cid, msgpack.packb(rec))
        txn.put(b"x" * 16, b"\xc1not msgpack")
    start, total, steps = None, 0, 0
    while True:
        start, n = expiry.sweep_step(env, db, start, now, ttl=ttl, step=300)
        total += n
        steps += 1
        if start is None:
            break
    assert steps == 9  # 2,501 records, 300 per step
    expired = {cid for cid, r in recs.items() if len(r) == 5 and r[4] < now - ttl}
    assert total == len(expired) > 0
    with env.begin(db=db) as txn:
        left = {bytes(k): msgpack.unpackb(v) for k, v in txn.cursor() if k != b"x" * 16}
        assert txn.get(b"x" * 16) == b"\xc1not msgpack"
    assert set(left) == set(recs) - expired
    for cid, rec in left.items():
        if len(recs[cid]) == 3:
            assert rec == [1, 0, [7, 3], [], int(now)]  # stamped: expires a TTL from now
        else:
            assert rec == recs[cid]
    # a second sweep a TTL later forgets the stamped ones too
    start = None
    while True:
        start, n = expiry.sweep_step(env, db, start, now + ttl + 1, ttl=ttl, step=300)
        if start is None:
            break
    with env.begin(db=db) as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == [b"x" * 16]  # only what it cannot read
    env.close()


def test_owner_records_carry_the_time_of_their_last_write(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.put("blobs", 1, b"x")
        shard = c.slot_map.shard_of((1).to_bytes(8, "big"))
        cid = c.client_id
    env = lmdb.open(str(cluster.config.shard_dir(shard)), readonly=True, lock=True, max_dbs=64)
    with env.begin(db=env.open_db(CLIENTS_DB, create=False)) as txn:
        rec = msgpack.unpackb(txn.get(cid))
    env.close()
    assert rec[0] >= 1 and rec[1] == 0 and rec[3] == []
    assert abs(rec[expiry.TIME_FIELD] - time.time()) < 60
