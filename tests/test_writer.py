"""Pipelined writes (``Client.writer``): order, exactly-once through owner kills, refusals."""

from __future__ import annotations

import os
import signal
import threading
import uuid

import pytest
import zmq

import lmshard
from lmshard import protocol
from lmshard.errors import (
    BatchesFailed,
    KeyEncodingError,
    OutOfOrder,
    ProtocolError,
    TransactionError,
)
from tests.cluster import Cluster, dealer
from tests.schemas import COUNTERS_ID


def _ask(sock: zmq.Socket[bytes], cid: bytes | None, seq: int, after: int, ops: list) -> list:
    sock.send(protocol.WRITE_AFTER.frame(cid, seq, after, ops))
    return protocol.unpack_frame(sock.recv())


def test_owner_applies_a_stream_in_order_and_replays_kept_replies(cluster: Cluster) -> None:
    with cluster.client() as c:
        ct = c.table("counters")
        kb = ct.kenc("stream")
        shard = ct.shard("stream", kb)
    op = protocol.op(protocol.OP_INCR, uuid.UUID(COUNTERS_ID).bytes, kb, 5)
    cid = os.urandom(16)
    sock = dealer(cluster, shard)
    # batch 2 before batch 1: refused, nothing applied
    seq, status, body = _ask(sock, cid, 2, 1, [op])
    assert (seq, status) == (2, OutOfOrder.code) and "nothing of batch 2" in body[0]
    first = _ask(sock, cid, 1, 0, [op])
    assert first[1] == 0 and first[2][1] == [5]
    second = _ask(sock, cid, 2, 1, [op])
    assert second[2][1] == [10]
    assert _ask(sock, cid, 3, 2, [op])[2][1] == [15]
    # a new connection resends batches 1 and 2: answered as the first time, not applied
    sock.close()
    sock = dealer(cluster, shard)
    assert _ask(sock, cid, 1, 0, [op]) == first
    assert _ask(sock, cid, 2, 1, [op]) == second
    # a batch that follows one never applied is refused; the stream then goes on
    assert _ask(sock, cid, 5, 4, [op])[1] == OutOfOrder.code
    assert _ask(sock, cid, 4, 3, [op])[2][1] == [20]
    # replies are kept for the last PIPELINE_WINDOW batches only
    for s in range(5, 5 + protocol.PIPELINE_WINDOW):
        assert _ask(sock, cid, s, s - 1, [op])[1] == 0
    old = _ask(sock, cid, 1, 0, [op])
    assert old[1] == 0 and old[2][1] is None  # acknowledged as long since applied, no results
    assert _ask(sock, None, 1, 0, [op])[1] == ProtocolError.code  # a stream needs a client id
    with cluster.client() as c:
        assert c.get("counters", "stream") == 5 * (4 + protocol.PIPELINE_WINDOW)
    sock.close()


def test_writer_puts_every_row_and_keeps_each_shards_order(cluster: Cluster) -> None:
    n = 6000
    with cluster.client() as c:
        with c.writer(batch_size=200, window=4) as w:
            for rnd in range(3):
                for i in range(n):
                    w.put("records", i, {"i": i, "round": rnd})
                w.incr("counters", "rounds")
        assert w.committed == c.counters()["batches_sent"]
        assert w.ops_committed == 3 * n + 3
        assert c.count("records") == n
        # every key was written in three batches; the last one sent is the one that stays
        assert all(v == {"i": k, "round": 2} for k, v in c.scan("records"))
        assert c.get("counters", "rounds") == 3
        assert {len(s.inflight) for s in w._streams.values()} <= {0}


def test_writer_rows_survive_owner_kills_applied_exactly_once(cluster: Cluster) -> None:
    victim, n = 1, 30_000

    def kill_and_restart() -> None:
        cluster.kill(victim)  # SIGKILL: what it had received but not committed is gone
        cluster.start(victim, wait=False)

    with cluster.client(timeout_ms=1000, retries=20) as c:
        with c.writer(batch_size=250, window=8) as w:
            for i in range(n):
                w.put("records", i, {"i": i})
                w.incr("counters", f"n{i % 8}")  # spread over shards, applied once or wrong
                if i in (n // 3, 2 * n // 3):
                    # Stop the owner so the writer's next batches pile up unanswered (the
                    # window fills and the writer waits), then kill it while they are in flight.
                    os.kill(cluster.pid(victim), signal.SIGSTOP)
                    threading.Timer(0.4, kill_and_restart).start()
        assert c.counters()["retries"] >= 2  # each kill cost the stream its batches in flight
        assert c.count("records") == n
        assert all(v == {"i": k} for k, v in c.scan("records"))
        assert [c.get("counters", f"n{j}") for j in range(8)] == [n // 8] * 8


def test_refused_batch_is_applied_not_at_all_and_named(cluster: Cluster) -> None:
    with cluster.client() as c:
        c.put("users", uuid.uuid4(), {"email": "taken@x.org"})
        keys = [uuid.uuid4() for _ in range(30)]
        w = c.writer(batch_size=10, window=4)
        for i, k in enumerate(keys):
            w.put("users", k, {"email": "taken@x.org" if i == 15 else f"w{i}@x.org"})
        with pytest.raises(BatchesFailed) as info:
            w.flush()
        w.close()
        err = info.value
        assert [(n, type(e).__name__) for _, n, e in err.failed] == [(10, "UniqueViolation")]
        assert err.committed == 2
        present = [c.get("users", k) is not None for k in keys]
        assert present == [True] * 10 + [False] * 10 + [True] * 10
        assert c.counters()["batches_failed"] == 1


def test_writer_refuses_bad_input_at_the_call(cluster: Cluster) -> None:
    with cluster.client() as c:
        for bad in ({"batch_size": 0}, {"window": 0},
                    {"window": protocol.PIPELINE_WINDOW + 1}, {"batch_size": "10"}):
            with pytest.raises(TransactionError):
                c.writer(**bad)  # type: ignore[arg-type]
        with c.writer(batch_size=5) as w:
            w.put("records", 1, {"ok": True})
            with pytest.raises(KeyEncodingError):
                w.put("records", -1, {"bad": "key"})
            with pytest.raises(TransactionError):
                w.incr("counters", "x", 1.5)  # type: ignore[arg-type]
        assert c.get("records", 1) == {"ok": True}
        assert c.count("records") == 1 and c.count("counters") == 0
        with pytest.raises(TransactionError):
            w.put("records", 2, {})  # closed


def test_closing_the_client_closes_an_unflushed_writer(cluster: Cluster) -> None:
    c = cluster.client()
    w = c.writer(batch_size=10)
    for i in range(25):
        w.put("records", i, {"i": i})  # two batches sent, five ops buffered
    c.close()  # returns (a socket left open would make the context wait forever)
    with pytest.raises(TransactionError):
        w.put("records", 99, {})
    with cluster.client() as c2:
        assert c2.count("records") in (0, 10, 20)  # whole batches or nothing, never part


def test_writer_names_a_shard_that_stays_down(cluster: Cluster) -> None:
    cluster.kill(2)
    with cluster.client(timeout_ms=200, retries=1) as c:
        w = c.writer(batch_size=5, window=2)
        with pytest.raises(lmshard.ShardUnavailable, match=r"shard 2 at ipc://.*unacknowledged"):
            for i in range(1000):
                w.put("records", i, {"i": i})
            w.flush()
        w.close()
        assert c.counters()["retries"] == 1 and c.counters()["timeouts"] == 2
