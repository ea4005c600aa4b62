"""The owner's side of the wire: idempotent retries, group commit isolation, hostile frames."""

from __future__ import annotations

import os
import signal
import time
import uuid

import msgpack
import zmq

from lmshard import protocol
from lmshard.errors import ProtocolError, UniqueViolation
from lmshard.protocol import PING, SCAN, WRITE
from tests.cluster import Cluster, dealer
from tests.schemas import COUNTERS_ID, USERS_ID


def _reply(sock: zmq.Socket[bytes]) -> list:
    return protocol.unpack_frame(sock.recv())


def _incr_op(cluster: Cluster, key: str) -> tuple[int, list]:
    with cluster.client() as c:
        ct = c.table("counters")
        kb = ct.kenc(key)
        return ct.shard(key, kb), protocol.op(protocol.OP_INCR, uuid.UUID(COUNTERS_ID).bytes,
                                              kb, 5)


def test_retried_batch_is_applied_once_and_answered_again(cluster: Cluster) -> None:
    shard, op = _incr_op(cluster, "retry")
    cid = os.urandom(16)
    frame = WRITE.frame(cid, 7, [op])
    sock = dealer(cluster, shard)
    sock.send(frame)
    first = _reply(sock)
    sock.close()
    # Lazy Pirate: a new socket (new identity) resends the very same sequence number.
    sock = dealer(cluster, shard)
    sock.send(frame)
    second = _reply(sock)
    assert first[1] == 0 and first == second  # same txn id, same result: the cached reply
    assert first[2][1] == [5]
    sock.send(WRITE.frame(cid, 8, [op]))
    assert _reply(sock)[2][1] == [10]  # the next sequence number is applied
    sock.send(WRITE.frame(cid, 6, [op]))
    assert _reply(sock)[1] == 0  # an older retry is acknowledged, not applied
    with cluster.client() as c:
        assert c.get("counters", "retry") == 10
    sock.close()


def test_bad_batch_fails_alone_inside_one_group_commit(cluster: Cluster) -> None:
    with cluster.client() as c:
        users = c.table("users")
        shard = users.route.pinned
        assert shard is not None
        taken = uuid.uuid4()
        c.put("users", taken, {"email": "taken@x.org"})
    tid = uuid.UUID(USERS_ID).bytes
    socks = [dealer(cluster, shard) for _ in range(5)]
    keys = [uuid.uuid4() for _ in socks]
    for s in socks:  # connect every socket before the owner is paused
        s.send(PING.frame(None, 1))
        _reply(s)
    os.kill(cluster.pid(shard), signal.SIGSTOP)
    try:
        for i, (s, k) in enumerate(zip(socks, keys, strict=True)):
            email = "taken@x.org" if i == 2 else f"u{i}@x.org"
            op = protocol.op(protocol.OP_PUT, tid, k.bytes, users.dumps({"email": email}))
            s.send(WRITE.frame(os.urandom(16), 1, [op]))
        time.sleep(0.3)  # every frame is queued at the paused owner
    finally:
        os.kill(cluster.pid(shard), signal.SIGCONT)
    replies = [_reply(s) for s in socks]
    assert replies[2][1] == UniqueViolation.code
    ok = [r for i, r in enumerate(replies) if i != 2]
    assert all(r[1] == 0 for r in ok)
    assert len({r[2][0] for r in ok}) == 1  # one commit: the same txn id for all four
    with cluster.client() as c:
        assert [c.get("users", k) is not None for k in keys] == [True, True, False, True, True]
    for s in socks:
        s.close()


def test_a_batch_alone_in_its_commit_fails_whole_and_keeps_its_reply(cluster: Cluster) -> None:
    # A group of one batch is applied in the commit's own transaction: when its last op fails,
    # nothing of it may stay, and its failure is kept like any other reply.
    with cluster.client() as c:
        users = c.table("users")
        shard = users.route.pinned
        assert shard is not None
        c.put("users", uuid.uuid4(), {"email": "alone@x.org"})
        before = c.stats()["shards"][shard]["owner"]
    tid = uuid.UUID(USERS_ID).bytes
    first, second = uuid.uuid4(), uuid.uuid4()
    ops = [protocol.op(protocol.OP_PUT, tid, first.bytes, users.dumps({"email": "new@x.org"})),
           protocol.op(protocol.OP_PUT, tid, second.bytes, users.dumps({"email": "alone@x.org"}))]
    cid = os.urandom(16)
    sock = dealer(cluster, shard)
    sock.send(WRITE.frame(cid, 1, ops))
    reply = _reply(sock)
    assert reply[1] == UniqueViolation.code
    sock.send(WRITE.frame(cid, 1, ops))  # sent again: the kept failure, not a second try
    assert _reply(sock) == reply
    with cluster.client() as c:
        assert c.get("users", first) is None and c.get("users", second) is None
        assert c.lookup("users", "by_email", "new@x.org") == []
        after = c.stats()["shards"][shard]["owner"]
    assert after["failed_batches"] == before["failed_batches"] + 1
    assert after["duplicate_batches"] == before["duplicate_batches"] + 1
    sock.send(WRITE.frame(cid, 2, ops[:1]))  # the next batch alone succeeds
    assert _reply(sock)[1] == 0
    with cluster.client() as c:
        assert c.get("users", first) == {"email": "new@x.org"}
    sock.close()


def test_hostile_frames_get_typed_errors_and_the_owner_keeps_serving(cluster: Cluster) -> None:
    sock = dealer(cluster, 0)
    good_tid = uuid.UUID(COUNTERS_ID).bytes

    def put(tid: bytes, key: bytes, value: object) -> list:
        return protocol.op(protocol.OP_PUT, tid, key, value)

    # Raw bytes for the frame layout itself; bodies built by the commands for the rest.
    bad_frames = [
        b"",
        b"\x09" + msgpack.packb([2, None, 1, []]),  # wrong protocol version
        b"\x01\xc1",  # never-used msgpack byte
        b"\x01" + msgpack.packb({"a": 1}),
        b"\x01" + msgpack.packb([2, None, 1]),
        b"\x01" + msgpack.packb([999, None, 1, None]),  # unknown command
        b"\x01" + msgpack.packb([2, b"short", 1, []]),  # client id not 16 bytes
        b"\x01" + msgpack.packb([2, None, -1, []]),
        WRITE.frame(None, 1, [put(b"x" * 16, b"k", b"v")]),  # unknown table
        WRITE.frame(None, 1, [put(good_tid, b"", b"v")]),  # empty key
        WRITE.frame(None, 1, [put(good_tid, b"k" * 600, b"v")]),  # key too long
        WRITE.frame(None, 1, [put(good_tid, b"k", "not bytes")]),
        WRITE.frame(None, 1, [protocol.op(7, good_tid, b"k", b"v")]),  # unknown op
        WRITE.frame(None, 1, [protocol.op(protocol.OP_INCR, good_tid, b"k", 2**64 - 1)]),
        SCAN.frame(None, 1, good_tid, None, None, False, 10**9),  # page over the limit
        WRITE.frame(None, 1, [put(good_tid, b"k", b"\xff\xfe")]),  # not CBOR
    ]
    for frame in bad_frames:
        sock.send(frame)
        seq, status, body = _reply(sock)
        assert status >= ProtocolError.code or status in (11, 13, 21), (frame, status, body)
        assert isinstance(body[0], str) and body[0]
    sock.send_multipart([b"a", b"b", b"c"])  # not our framing at all: dropped silently
    sock.send(PING.frame(None, 42))
    seq, status, body = _reply(sock)
    assert (seq, status) == (42, 0) and body["shard"] == 0
    with cluster.client() as c:
        assert c.count("counters") == 0  # nothing was half-written
    sock.close()


def test_protocol_doc_is_generated_from_the_registry() -> None:
    from pathlib import Path

    from lmshard import wire
    from lmshard.protocol.docs import render_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
    assert doc.read_text() == render_markdown(), (
        "docs/protocol.md is stale: run python -m lmshard.protocol > docs/protocol.md")
    assert protocol.REQUESTS is wire.CHANNELS["requests"]
    assert all(f"| {c.code} | `{c.name}` |" in doc.read_text() for c in protocol.COMMANDS.values())


def test_the_registry_builds_the_bytes_the_wire_carries() -> None:
    """The frame layout, byte for byte: a command's frame is the version byte and the msgpack
    array [code, client id, seq, body], with the code and body its declaration gives."""
    cid = bytes(range(16))
    assert WRITE.frame(cid, 7, [[1, b"t" * 16, b"k", b"v"]]) == b"\x01" + msgpack.packb(
        [2, cid, 7, [[1, b"t" * 16, b"k", b"v"]]], use_bin_type=True)
    assert PING.frame(None, 42) == b"\x01" + msgpack.packb([1, None, 42, None])
    assert protocol.READ.frame(None, 5, 1, protocol.GET.code, [b"t" * 16, b"k"]) == (
        b"\x01" + msgpack.packb([15, None, 5, [1, 10, [b"t" * 16, b"k"]]], use_bin_type=True))
    assert protocol.WRITE_AFTER.request_for(3, []) == (3, [3, []])


def test_every_command_declares_its_body_fields_for_the_docs_and_the_checks() -> None:
    """A body built by a command passes the field checks of its wire message."""
    tid, kb = b"t" * 16, b"k"
    built = {
        "get": protocol.GET.build(tid, kb),
        "get_many": protocol.GET_MANY.build(tid, [kb]),
        "scan": SCAN.build(tid, None, b"z", True, 10),
        "lookup": protocol.LOOKUP.build(tid, "by_x", b"v", False),
        "count": protocol.COUNT.build(tid, None, None),
        "read": protocol.READ.build(0, protocol.COUNT.code, [tid, None, None]),
        "write_after": protocol.WRITE_AFTER.build(0, []),
    }
    for name, body in built.items():
        assert protocol.COMMANDS[name].message.check(body) is None, name
    assert SCAN.message.check(SCAN.build(tid, None, None, 1, 10)) is not None  # reverse: bool
    assert protocol.COMMANDS["get"].request == "[table id, key]"
