"""The owner's side of a re-shard, on the wire: slot states recorded and served by, client
writes refused for slots the shard does not own (SlotMoved) or is switching (SlotsMoving),
rows moved in and out with move_rows, foreign rows never read, and none of it in a watch."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from lmshard import protocol
from lmshard.errors import ProtocolError, SlotMoved, SlotsMoving, error_from_wire
from lmshard.index_values import encode_index_value
from lmshard.protocol import (
    COUNT,
    GET,
    GET_MANY,
    LOOKUP,
    MOVE_ROWS,
    PING,
    READ,
    SCAN,
    SLOT_STATE,
    WRITE,
)
from lmshard.routing import SlotMap, TableRoute
from lmshard.slot_state import SlotState
from tests.cluster import Cluster
from tests.schemas import blobs, items

TID = blobs.table_id.bytes


class Wire:
    """A protocol-level DEALER to one owner: requests as a client library would send them."""

    def __init__(self, cluster: Cluster, shard: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(cluster.config.endpoint(shard))

    def call(self, cmd: protocol.Command, body: Any, *, cid: bytes | None = None, seq: int = 1,
             rv: int = 0) -> tuple[int, Any]:
        """(status, body) of the reply."""
        self.sock.send(protocol.pack_request(cmd.code, cid, seq, body, 0, rv))
        got_seq, status, reply = protocol.unpack_frame(self.sock.recv())
        assert got_seq == seq
        return status, reply

    def ok(self, cmd: protocol.Command, body: Any, **kw: Any) -> Any:
        status, reply = self.call(cmd, body, **kw)
        assert status == 0, reply
        return reply

    def state(self) -> SlotState:
        return SlotState.from_wire(self.ok(SLOT_STATE, None)["state"])

    def record(self, state: SlotState) -> dict[str, Any]:
        reply: dict[str, Any] = self.ok(SLOT_STATE, state.to_wire())
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Cluster]:
    """Two real owners (slot map version 0)."""
    c = Cluster(tmp_path, shards=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def key_in(slot_map: SlotMap, shard: int, avoid: frozenset[int] = frozenset(),
           start: int = 0) -> tuple[int, bytes, int]:
    """(key, encoded key, slot) of a blobs row that ``slot_map`` puts on ``shard``."""
    route = TableRoute(blobs, slot_map)
    for k in range(start, start + 100_000):
        kb = blobs.key.encode(k)
        slot = route.slot(k, kb)
        if slot_map.assignment[slot] == shard and slot not in avoid:
            return k, kb, slot
    raise AssertionError("no key found")


def put(kb: bytes, value: bytes = b"v") -> list[Any]:
    return protocol.op(protocol.OP_PUT, TID, kb, value)


def delete(kb: bytes) -> list[Any]:
    return protocol.op(protocol.OP_DELETE, TID, kb, None)


def moved_to(m: SlotMap, slots: frozenset[int], shard: int) -> SlotMap:
    """``m`` with ``slots`` assigned to ``shard``."""
    table = list(m.assignment)
    for s in slots:
        table[s] = shard
    return SlotMap(m.shards, m.slots, table, empty_ok=True)


def refused(reply: tuple[int, Any], err: type) -> list[Any]:
    status, body = reply
    assert status == err.code, body
    return body  # type: ignore[no-any-return]


def test_writes_wait_while_frozen_and_move_after_the_switch(two: Cluster) -> None:
    m = two.config.slot_map
    a, b = Wire(two, 0), Wire(two, 1)
    _, kb, s = key_in(m, 0)
    _, other_kb, _ = key_in(m, 0, avoid=frozenset({s}))
    cid, cid2 = uuid.uuid4().bytes, uuid.uuid4().bytes
    first = a.ok(WRITE, [put(kb, b"before")], cid=cid, seq=1)

    start = a.state()
    assert start.version == 0 and start.map == m and not start.moving
    frozen = SlotState(0, m, frozen=frozenset({s}))
    assert a.record(frozen)["state"] == frozen.to_wire()
    body = refused(a.call(WRITE, [put(kb)], cid=cid2, seq=1), SlotsMoving)
    assert f"slot {s}" in body[0]
    a.ok(WRITE, [put(other_kb)], cid=cid2, seq=1)  # the shard's other slots take writes
    assert a.ok(PING, None)["slots"] == {"version": 0, **frozen.moves_dict()}

    m2 = moved_to(m, frozenset({s}), 1)
    b.record(SlotState(1, m2))
    switched = SlotState(1, m2, outgoing=frozenset({s}))
    a.record(switched)
    # A batch applied before the switch is answered as it was, whatever the map says now.
    assert a.ok(WRITE, [put(kb, b"before")], cid=cid, seq=1) == first
    body = refused(a.call(WRITE, [put(kb)], cid=cid2, seq=2), SlotMoved)
    err = error_from_wire(SlotMoved.code, *body)
    assert isinstance(err, SlotMoved) and err.version == 1 and err.map == m2.to_dict()
    # Refused without a client record: the same sequence number is applied when it fits.
    assert a.ok(WRITE, [put(other_kb, b"2")], cid=cid2, seq=2, rv=1)[1] == [None]
    assert a.ok(PING, None)["slots"]["outgoing"] == [[s, s + 1]]
    assert a.ok(protocol.STATS, None)["slot_version"] == 1
    a.close()
    b.close()


def test_reads_skip_foreign_rows_and_send_stale_readers_on(two: Cluster) -> None:
    m = two.config.slot_map
    a = Wire(two, 0)
    _, kb, s = key_in(m, 0)
    _, other_kb, _ = key_in(m, 0, avoid=frozenset({s}))
    a.ok(WRITE, [put(kb, b"moving"), put(other_kb, b"staying")])
    assert a.ok(COUNT, [TID, None, None]) == 2
    m2 = moved_to(m, frozenset({s}), 1)
    a.record(SlotState(1, m2, outgoing=frozenset({s})))

    refused(a.call(GET, [TID, kb]), SlotMoved)  # routed by version 0
    refused(a.call(GET_MANY, [TID, [other_kb, kb]]), SlotMoved)
    refused(a.call(SCAN, [TID, None, None, False, 10]), SlotMoved)
    assert a.ok(GET, [TID, other_kb]) == b"staying"  # a key the shard still owns
    assert a.ok(GET, [TID, kb], rv=1) is None  # the row is still here, but not the shard's
    assert a.ok(GET_MANY, [TID, [kb, other_kb]], rv=1) == [None, b"staying"]
    assert a.ok(SCAN, [TID, None, None, False, 10], rv=1) == [[[other_kb, b"staying"]], False]
    assert a.ok(SCAN, [TID, None, None, False, 1], rv=1) == [[[other_kb, b"staying"]], False]
    assert a.ok(COUNT, [TID, None, None], rv=1) == 1
    a.close()


def test_lookups_skip_foreign_rows(two: Cluster) -> None:
    m = two.config.slot_map
    a = Wire(two, 0)
    k, kb, s = key_in(m, 0)
    other, other_kb, _ = key_in(m, 0, avoid=frozenset({s}))
    assert items.key.encode(k) == kb  # the same key kind: the same slot
    tid = items.table_id.bytes
    group = items.value.dumps({"group": "g"})
    a.ok(WRITE, [protocol.op(protocol.OP_PUT, tid, kb, group),
                 protocol.op(protocol.OP_PUT, tid, other_kb, group)])
    by_group = [tid, "by_group", encode_index_value("g"), False]
    assert len(a.ok(LOOKUP, by_group)) == 2
    a.record(SlotState(0, m, frozen=frozenset({s})))
    assert len(a.ok(LOOKUP, by_group)) == 2  # frozen rows are still the shard's
    a.record(SlotState(1, moved_to(m, frozenset({s}), 1), outgoing=frozenset({s})))
    refused(a.call(LOOKUP, by_group), SlotMoved)
    assert a.ok(LOOKUP, by_group, rv=1) == [[other_kb, group]]
    a.close()


def test_slot_state_refuses_a_lower_version_or_a_malformed_state(two: Cluster) -> None:
    m = two.config.slot_map
    a = Wire(two, 0)
    _, _, s = key_in(m, 0)
    _, _, theirs = key_in(m, 1)
    m2 = moved_to(m, frozenset({s}), 1)
    done = SlotState(2, m2, outgoing=frozenset({s}))
    txn = a.record(done)["txn"]
    for bad in (SlotState(1, m2).to_wire(),                       # lower
                SlotState(2, m).to_wire(),                        # another map, same version
                SlotState(3, m2, frozen=frozenset({s})).to_wire(),    # frozen, not its slot
                SlotState(3, m2, incoming=frozenset({0})).to_wire(),  # incoming, its own
                {**SlotState(3, m2).to_wire(), "version": "3"},
                {**SlotState(3, m2).to_wire(), "outgoing": [[5, 2]]},
                SlotState(3, SlotMap(2, 512)).to_wire()):         # other slot count
        refused(a.call(SLOT_STATE, bad), ProtocolError)
    reply = a.ok(SLOT_STATE, None)
    assert SlotState.from_wire(reply["state"]) == done and reply["txn"] == txn
    assert theirs not in done.outgoing
    a.close()


def test_move_rows_only_touch_moving_slots(two: Cluster) -> None:
    m = two.config.slot_map
    a, b = Wire(two, 0), Wire(two, 1)
    _, kb, s = key_in(m, 0)
    _, own_kb, _ = key_in(m, 1)
    _, other_kb, _ = key_in(m, 0, avoid=frozenset({s}))
    cid = uuid.uuid4().bytes
    refused(b.call(MOVE_ROWS, [put(kb)], cid=cid, seq=1), ProtocolError)  # not incoming yet
    b.record(SlotState(0, m, incoming=frozenset({s})))
    # An op outside the moving slots fails the whole batch.
    refused(b.call(MOVE_ROWS, [put(kb), put(own_kb)], cid=cid, seq=1), ProtocolError)
    refused(b.call(MOVE_ROWS, [put(kb), put(other_kb)], cid=cid, seq=1), ProtocolError)
    first = b.ok(MOVE_ROWS, [put(kb, b"copied")], cid=cid, seq=1)
    assert b.ok(MOVE_ROWS, [put(kb, b"copied")], cid=cid, seq=1) == first  # applied once
    assert b.ok(MOVE_ROWS, [delete(kb)], cid=cid, seq=2)[1] == [True]
    b.ok(MOVE_ROWS, [put(kb, b"copied")], cid=cid, seq=3)
    assert b.ok(GET, [TID, kb]) is None  # an incoming slot's rows are not read

    a.ok(WRITE, [put(kb, b"copied")])
    m2 = moved_to(m, frozenset({s}), 1)
    b.record(SlotState(1, m2))
    a.record(SlotState(1, m2, outgoing=frozenset({s})))
    assert b.ok(GET, [TID, kb], rv=1) == b"copied"
    refused(a.call(MOVE_ROWS, [put(kb)], cid=cid, seq=1), ProtocolError)  # outgoing: no puts
    assert a.ok(MOVE_ROWS, [delete(kb)], cid=cid, seq=1)[1] == [True]
    a.record(SlotState(1, m2))
    assert a.ok(COUNT, [TID, None, None], rv=1) == 0
    refused(a.call(MOVE_ROWS, [delete(kb)], cid=cid, seq=2), ProtocolError)
    a.close()
    b.close()


def test_the_slot_state_outlives_an_owner_restart(two: Cluster) -> None:
    m = two.config.slot_map
    a = Wire(two, 0)
    _, kb, s = key_in(m, 0)
    m2 = moved_to(m, frozenset({s}), 1)
    state = SlotState(4, m2, outgoing=frozenset({s}))
    a.record(state)
    a.close()
    two.kill(0, signal.SIGTERM)
    two.start(0)
    a = Wire(two, 0)
    assert a.state() == state
    refused(a.call(WRITE, [put(kb)], rv=3), SlotMoved)
    a.close()


def test_the_reader_pool_reads_by_the_shards_slot_state(tmp_path: Path) -> None:
    from lmshard.remote import reader_endpoint
    from tests.test_readers import Readers

    cluster = Cluster(tmp_path, shards=2, readers=1)
    readers = Readers(cluster)
    try:
        cluster.start()
        readers.start()
        m = cluster.config.slot_map
        a, b = Wire(cluster, 0), Wire(cluster, 1)
        _, kb, s = key_in(m, 0)
        _, other_kb, _ = key_in(m, 0, avoid=frozenset({s}))
        a.ok(WRITE, [put(kb, b"moving"), put(other_kb, b"staying")])
        pool = zmq.Context.instance().socket(zmq.DEALER)
        pool.setsockopt(zmq.LINGER, 0)
        pool.setsockopt(zmq.RCVTIMEO, 10_000)
        pool.connect(reader_endpoint(cluster.config, 0))

        def read(shard: int, cmd: protocol.Command, body: Any, rv: int = 0) -> tuple[int, Any]:
            pool.send(protocol.pack_request(READ.code, None, 1, [shard, cmd.code, body], 0, rv))
            _, status, reply = protocol.unpack_frame(pool.recv())
            return status, reply

        assert read(0, COUNT, [TID, None, None]) == (0, 2)
        assert read(1, COUNT, [TID, None, None]) == (0, 0)
        # Moving slots without a new version: the next read sees them.
        b.record(SlotState(0, m, incoming=frozenset({s})))
        b.ok(MOVE_ROWS, [put(kb, b"moving")], cid=uuid.uuid4().bytes, seq=1)
        assert read(1, COUNT, [TID, None, None]) == (0, 0)
        assert read(1, SCAN, [TID, None, None, False, 10]) == (0, [[], False])
        m2 = moved_to(m, frozenset({s}), 1)
        b.record(SlotState(1, m2))
        a.record(SlotState(1, m2, outgoing=frozenset({s})))
        refused(read(0, GET, [TID, kb]), SlotMoved)
        assert read(0, GET, [TID, kb], rv=1) == (0, None)
        assert read(0, GET, [TID, other_kb], rv=0) == (0, b"staying")
        assert read(0, COUNT, [TID, None, None], rv=1) == (0, 1)
        assert read(1, GET, [TID, kb], rv=1) == (0, b"moving")
        pool.close()
        a.close()
        b.close()
    finally:
        readers.stop()
        cluster.stop()


def test_watchers_never_see_moved_rows_nor_slot_states(two: Cluster) -> None:
    m = two.config.slot_map
    b = Wire(two, 1)
    _, kb, s = key_in(m, 0)
    _, own_kb, _ = key_in(m, 1)
    with two.client() as c, c.watch() as w:
        b.record(SlotState(0, m, incoming=frozenset({s})))
        b.ok(MOVE_ROWS, [put(kb, b"moved")], cid=uuid.uuid4().bytes, seq=1)
        b.ok(WRITE, [put(own_kb, b"written")])
        b.ok(MOVE_ROWS, [delete(kb)], cid=uuid.uuid4().bytes, seq=1)
        b.record(SlotState(0, m))
        b.ok(WRITE, [delete(own_kb)])
        seen = []
        while (change := w.get(2.0)) is not None:
            seen.append((change.table, change.value))
        assert seen == [("blobs", b"written"), ("blobs", None)]
    b.close()


def test_a_replica_applies_slot_states_and_moved_rows(tmp_path: Path) -> None:
    from functools import partial

    from lmshard.slot_state import read_slot_state
    from lmshard.store_meta import read_meta
    from tests.cluster import wait_for
    from tests.test_replica import R, Replicas, assert_identical, caught_up, following

    svc = Cluster(tmp_path, shards=2, replica_names=[R], replica_data_dir=str(tmp_path / "rep"))
    reps = Replicas(svc)
    try:
        svc.start()
        reps.start(1)
        wait_for("replica following", partial(following, svc.config, 1))
        m = svc.config.slot_map
        b = Wire(svc, 1)
        k, kb, s = key_in(m, 0)
        _, gone_kb, s2 = key_in(m, 0, start=k + 1, avoid=frozenset({s}))
        moving = frozenset({s, s2})
        b.record(SlotState(0, m, incoming=moving))
        cid = uuid.uuid4().bytes
        b.ok(MOVE_ROWS, [put(kb, b"moved"), put(gone_kb, b"dropped")], cid=cid, seq=1)
        b.ok(MOVE_ROWS, [delete(gone_kb)], cid=cid, seq=2)
        wait_for("replica caught up", partial(caught_up, svc.config, 1))
        replica = Wire(svc, 1)
        replica.sock.disconnect(svc.config.endpoint(1))
        replica.sock.connect(svc.config.member(1, R).endpoint)
        assert replica.ok(COUNT, [TID, None, None]) == 0  # the copy's reads skip them too
        m2 = moved_to(m, moving, 1)
        switched = SlotState(1, m2)
        b.record(switched)
        wait_for("replica caught up", partial(caught_up, svc.config, 1))
        assert replica.ok(GET, [TID, kb]) == b"moved"
        refused(replica.call(GET, [TID, key_in(m2, 0)[1]]), SlotMoved)  # routed by version 0
        replica.close()
        b.close()
        reps.stop()
        svc.stop()
        assert_identical(svc.config, 1)
        replica_meta = read_meta(svc.config.member(1, R).dir)
        assert replica_meta is not None
        assert read_slot_state(replica_meta, svc.config) == switched
    finally:
        reps.stop()
        svc.stop()
