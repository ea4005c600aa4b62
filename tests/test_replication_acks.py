"""The owner's side of replicas: acks held for ``durability.replicas``, ReplicaTimeout, client
records in the change log, the epoch in acks and fencing.

Real owner processes (tests.cluster); the replica is ``tests.replica_follower.Follower``, which
speaks REPLICATE / CREDIT / APPLIED over a real DEALER socket. It stands in for ``lmshardd
replica`` only because that process is being written alongside and is not in the tree yet.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from lmshard import protocol
from lmshard.changes import CLIENTS_TABLE_ID
from lmshard.changes_wire import ERROR, STARTED
from lmshard.errors import ConflictError, NotPrimary, ProtocolError, ReplicaTimeout
from lmshard.protocol import PING, WRITE
from tests.cluster import Cluster
from tests.replica_follower import Follower
from tests.schemas import BLOBS_ID, COUNTERS_ID

BLOBS = uuid.UUID(BLOBS_ID).bytes
COUNTERS = uuid.UUID(COUNTERS_ID).bytes


def _cluster(tmp_path: Path, **settings: Any) -> Cluster:
    settings.setdefault("replica_names", ["b"])
    return Cluster(tmp_path, shards=1, **settings)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Cluster]:
    """One shard that acks a write once replica b has it (and waits long for it)."""
    with _cluster(tmp_path, replicas_required=1, replica_timeout=30.0) as c:
        yield c


class Writer:
    """Write batches with a fixed client id and chosen sequence numbers on a real DEALER."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cid = os.urandom(16)
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(cluster.config.endpoint(0))
        with cluster.client() as c:
            self.table = c.table("blobs")
            self.counters = c.table("counters")

    def put(self, seq: int, key: int, value: bytes, epoch: int = 0) -> None:
        op = protocol.op(protocol.OP_PUT, BLOBS, self.table.kenc(key), value)
        self.sock.send(protocol.pack_request(WRITE.message.code, self.cid, seq,
                                             WRITE.build([op]), epoch=epoch))

    def incr(self, seq: int, key: str, delta: int) -> None:
        op = protocol.op(protocol.OP_INCR, COUNTERS, self.counters.kenc(key), delta)
        self.sock.send(WRITE.frame(self.cid, seq, [op]))

    def reply(self, timeout: float) -> list[Any] | None:
        """``[seq, status, body]`` of the next reply within ``timeout`` s; None if none."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return protocol.unpack_frame(self.sock.recv())

    def close(self) -> None:
        self.sock.close(linger=0)


def _txn_of(follower: Follower, key_bytes: bytes) -> int:
    """The transaction whose CHANGES put ``key_bytes`` in blobs."""
    for txn, (_idx, effects) in follower.changes.items():
        if any(e[0] == BLOBS and e[1] == key_bytes for e in effects):
            return txn
    return 0


def test_an_ack_waits_until_a_replica_applied_its_transaction(held: Cluster) -> None:
    f, w = Follower(held.config), Writer(held)
    try:
        assert f.replicate().message is STARTED
        kb = w.table.kenc(1)
        w.put(1, 1, b"one")
        f.until("the write's CHANGES", lambda: _txn_of(f, kb))
        txn = _txn_of(f, kb)
        assert w.reply(0.5) is None  # committed, streamed, not acked
        with held.client() as c:  # other requests are answered meanwhile
            assert c.ping(0)["txn_id"] >= txn
        failing = Writer(held)  # and a batch that fails is answered at once: nothing to wait for
        try:
            op = protocol.op(protocol.OP_CAS, BLOBS, kb, [b"new", 0, None])  # must be absent
            failing.sock.send(WRITE.frame(failing.cid, 1, [op]))
            refused = failing.reply(5.0)
            assert refused is not None and refused[1] == ConflictError.code, refused
        finally:
            failing.close()
        f.applied(txn - 1)
        assert w.reply(0.5) is None  # an earlier transaction does not cover it
        f.applied(txn)
        reply = w.reply(5.0)
        assert reply is not None and reply[1] == 0, reply
        assert reply[2] == [txn, [None], 1]  # txn id, results, epoch
        # The replica got the batch's client record after its put, as the owner keeps it.
        _idx, effects = f.changes[txn]
        assert effects[0][:2] == [BLOBS, kb]
        assert effects[-1][:2] == [CLIENTS_TABLE_ID, w.cid]
        seq, status, kept, *_ = msgpack.unpackb(effects[-1][2], raw=False)
        assert (seq, status, kept[0]) == (1, 0, txn)
        # Once the replica is ahead, a replayed batch is answered at once.
        w.put(1, 1, b"one")
        again = w.reply(5.0)
        assert again is not None and again[2][0] == txn
    finally:
        f.close()
        w.close()


def test_a_silent_replica_makes_writes_time_out_but_they_stay_committed(
        tmp_path: Path) -> None:
    with _cluster(tmp_path, replicas_required=1, replica_timeout=1.0) as cl:
        f, w = Follower(cl.config), Writer(cl)
        try:
            assert f.replicate().message is STARTED
            started = time.monotonic()
            w.incr(1, "k", 5)
            reply = w.reply(10.0)
            waited = time.monotonic() - started
            assert reply is not None and reply[1] == ReplicaTimeout.code, reply
            assert waited >= 0.9
            f.until("the write's CHANGES", lambda: f.changes)
            (txn,) = f.changes
            message = reply[2][0]
            assert f"transaction {txn}" in message and "only 0 of the 1 replicas" in message
            with cl.client() as c:
                assert c.get("counters", "k") == 5  # committed on the owner
                assert c.ping(0)["replicas"]["b"]["lag_txns"] >= 1
            # Sent again: answered from its kept record (not applied again), and it waits again.
            w.incr(1, "k", 5)
            assert w.reply(0.5) is None
            f.applied(txn)
            again = w.reply(5.0)
            assert again is not None and again[1] == 0, again
            assert again[2][0] == txn and again[2][1] == [5]
            f.drain(0.3)
            assert list(f.changes) == [txn]  # nothing new was logged for the resend
            with cl.client() as c:
                assert c.get("counters", "k") == 5
        finally:
            f.close()
            w.close()


def test_the_log_carries_client_records_to_replicas_and_never_to_watchers(
        tmp_path: Path) -> None:
    with _cluster(tmp_path) as cl:  # replicas named, acks not waiting for them
        f, raw = Follower(cl.config), Follower(cl.config)
        writers = [Writer(cl), Writer(cl)]
        try:
            assert f.replicate().message is STARTED
            assert raw.watch().message is STARTED
            with cl.client() as c:
                watch = c.watch(since="start")
                blobs_only = c.watch("blobs", since="start")
            # Two batches in one group commit: [put 10, client record, put 11, client record].
            for w in writers:  # connected before the owner stops
                w.sock.send(PING.frame(None, 1))
                assert w.reply(5.0) is not None
            os.kill(cl.pid(0), signal.SIGSTOP)
            try:
                writers[0].put(1, 10, b"ten")
                writers[1].put(1, 11, b"eleven")
                time.sleep(0.3)
            finally:
                os.kill(cl.pid(0), signal.SIGCONT)
            for w in writers:
                reply = w.reply(10.0)
                assert reply is not None and reply[1] == 0
            f.until("the group's CHANGES", lambda: f.changes)
            (txn,) = f.changes
            indexes, effects = f.changes[txn]
            assert indexes is None and len(effects) == 4  # the whole record, as stored
            assert [e[0] for e in effects] == [BLOBS, CLIENTS_TABLE_ID, BLOBS, CLIENTS_TABLE_ID]
            assert {effects[1][1], effects[3][1]} == {w.cid for w in writers}

            raw.until("the watch's CHANGES", lambda: raw.changes)
            w_indexes, w_effects = raw.changes[txn]
            assert w_indexes == [0, 2]  # places in the record, client records skipped
            assert w_effects == [effects[0], effects[2]]
            resumed = Follower(cl.config)
            try:  # from (txn, 1): the second put only
                assert resumed.watch(raw.history, txn, 1).message is STARTED
                resumed.until("the resumed CHANGES", lambda: resumed.changes)
                assert resumed.changes[txn] == ([2], [effects[2]])
            finally:
                resumed.close()

            for wt in (watch, blobs_only):
                seen = []
                while (change := wt.get(timeout=2.0)) is not None:
                    seen.append((change.table, change.key))
                assert sorted(seen) == [("blobs", 10), ("blobs", 11)]
                wt.close()
        finally:
            for x in (f, raw, *writers):
                x.close()


def test_a_request_from_a_later_epoch_fences_the_owner(held: Cluster) -> None:
    f, w, late = Follower(held.config), Writer(held), Writer(held)
    try:
        assert f.replicate().message is STARTED
        w.put(1, 20, b"held")  # committed, waiting for the replica
        f.until("the held write's CHANGES", lambda: f.changes)
        assert w.reply(0.3) is None
        late.put(1, 21, b"from epoch 2", epoch=2)
        reply = late.reply(5.0)
        assert reply is not None and reply[1] == NotPrimary.code, reply
        message, _hint, primary, epoch = reply[2]
        assert primary is None and epoch == 1 and "epoch 2" in message
        held_reply = w.reply(5.0)  # the held ack will never be confirmed here
        assert held_reply is not None and held_reply[1] == NotPrimary.code, held_reply
        assert held.procs[0].wait(timeout=20) == 3
        assert "from epoch 2" in held.logs[0].read_text()
        held.start(0)
        with held.client() as c:
            assert c.get("blobs", 21) is None  # the fenced write was not applied
            assert c.ping(0)["epoch"] == 1
    finally:
        f.close()
        w.close()
        late.close()


def test_without_required_replicas_writes_are_acked_at_once_with_the_epoch(
        tmp_path: Path) -> None:
    with _cluster(tmp_path) as cl:  # no replica follows at all
        w = Writer(cl)
        try:
            w.put(1, 30, b"x")
            reply = w.reply(5.0)
            assert reply is not None and reply[1] == 0
            txn, results, epoch = reply[2]
            assert results == [None] and epoch == 1
            with cl.client() as c:
                c.put("blobs", 31, b"y")
                health = c.ping(0)
                assert c.get("blobs", 30) == b"x"
            assert (health["member"], health["role"], health["epoch"], health["primary"]) == (
                "home", "primary", 1, "home")
            assert health["replicas"] == {}
        finally:
            w.close()


def test_replicate_from_a_name_not_configured_is_refused(held: Cluster) -> None:
    f = Follower(held.config, name="zed")
    try:
        msg = f.replicate()
        assert msg.message is ERROR
        code, message, _hint = msg.values
        assert code == ProtocolError.code and "'zed'" in message and "b" in message
        with held.client() as c:
            assert c.ping(0)["replicas"] == {}
    finally:
        f.close()


def test_applied_past_what_was_sent_is_refused_and_releases_nothing(held: Cluster) -> None:
    f, w = Follower(held.config), Writer(held)
    try:
        assert f.replicate().message is STARTED
        w.put(1, 40, b"x")
        f.until("the write's CHANGES", lambda: f.changes)
        (txn,) = f.changes
        f.applied(txn + 100)
        deadline = time.monotonic() + 5.0
        msg = f.recv(5.0)
        while msg is not None and msg.message is not ERROR and time.monotonic() < deadline:
            msg = f.recv(1.0)  # PROGRESS heartbeats meanwhile
        assert msg is not None and msg.message is ERROR, msg
        assert "was not sent yet" in msg.values[1]
        assert w.reply(0.5) is None  # still held
        # The replica follows again (same name, new follow) and applies it: the ack goes.
        assert f.replicate(f.history, txn).message is STARTED
        f.applied(txn)
        reply = w.reply(5.0)
        assert reply is not None and reply[1] == 0 and reply[2][0] == txn
    finally:
        f.close()
        w.close()
