"""Fuzz the wire decoder and every command's validation against a live owner and reader pool.

Hypothesis builds batches of frames: random bytes, random msgpack after the version byte, and
valid requests of every command (writes, reads, pool reads, ping, stats) mutated by flipping,
inserting and truncating bytes, swapping fields and putting values of the wrong type in any
field. Each batch is sent at once, then every reply is read: each single-frame message must get
exactly one well-formed reply (a result or a typed error), multi-frame messages are dropped,
and afterwards the process still serves valid requests with the right data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmshard import changes_wire, protocol
from lmshard.errors import InternalError, ProtocolError
from lmshard.protocol import (
    COUNT,
    GET,
    GET_MANY,
    LOOKUP,
    PING,
    READ,
    SCAN,
    STATS,
    WRITE,
    WRITE_AFTER,
)
from lmshard.remote import reader_endpoint
from tests.cluster import Cluster
from tests.schemas import schema
from tests.test_readers import Readers

BATCH = 100
"""Frames sent before the replies are read."""
EXAMPLES = 80
"""Batches per target: 2 targets x 80 x 100 = 16,000 frames."""
TABLES = list(schema.tables.values())

_wrong = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
    st.text(max_size=12), st.binary(max_size=24),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
)
"""A value of some type, usually not the one a field wants."""


def _key_values(table: Any) -> st.SearchStrategy[Any]:
    kinds = table.key.spec if isinstance(table.key.spec, tuple) else (table.key.spec,)
    parts = []
    for kind in kinds:
        if kind == "uuid":
            parts.append(st.uuids())
        elif kind == "str":
            parts.append(st.text(max_size=16))
        elif kind == "bytes":
            parts.append(st.binary(max_size=16))
        else:
            parts.append(st.integers(0, 2**63 - 1))
    return parts[0] if len(parts) == 1 else st.tuples(*parts)


@st.composite
def _key(draw: st.DrawFn, table: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=40))
    try:
        return bytes(table.key.encode(draw(_key_values(table))))
    except Exception:
        return b"k"


@st.composite
def _table_and_key(draw: st.DrawFn) -> tuple[Any, bytes, bytes]:
    table = draw(st.sampled_from(TABLES))
    return table, table.table_id.bytes, draw(_key(table))


@st.composite
def _value(draw: st.DrawFn, table: Any) -> bytes:
    row = {"email": draw(st.text(max_size=8)), "group": draw(st.sampled_from(["a", "b"])),
           "n": draw(st.integers(0, 9))}
    try:
        return bytes(table.value.dumps(row if table.value.name != "bytes" else b"raw"))
    except Exception:
        return draw(st.binary(max_size=30))


@st.composite
def _read(draw: st.DrawFn) -> tuple[int, Any]:
    """A valid read command: (code, body)."""
    table, tid, kb = draw(_table_and_key())
    bound = st.one_of(st.none(), _key(table))
    cmd = draw(st.sampled_from([GET, GET_MANY, SCAN, LOOKUP, COUNT]))
    if cmd is GET:
        return GET.request_for(tid, kb)
    if cmd is GET_MANY:
        return GET_MANY.request_for(tid, draw(st.lists(_key(table), max_size=5)))
    if cmd is SCAN:
        return SCAN.request_for(tid, draw(bound), draw(bound), draw(st.booleans()),
                                draw(st.integers(1, 50)))
    if cmd is LOOKUP:
        index = draw(st.sampled_from(list(table.indexes) or ["none"]))
        return LOOKUP.request_for(tid, index, draw(st.binary(max_size=12)),
                                  draw(st.booleans()))
    return COUNT.request_for(tid, draw(bound), draw(bound))


@st.composite
def _owner_request(draw: st.DrawFn) -> list[Any]:
    seq = draw(st.integers(0, 2**20))
    kind = draw(st.sampled_from(["write", "write", "write_after", "read", "ping", "stats"]))
    if kind in ("write", "write_after"):
        ops = []
        for _ in range(draw(st.integers(1, 3))):
            table, tid, kb = draw(_table_and_key())
            op = draw(st.sampled_from([1, 2, 3, 4]))
            arg: Any = {1: draw(_value(table)), 2: None, 4: draw(st.integers(-9, 9)),
                        3: [draw(_value(table)), draw(st.sampled_from([0, 1, 2])),
                            draw(st.one_of(st.none(), st.binary(max_size=16)))]}[op]
            ops.append(protocol.op(op, tid, kb, arg))
        cid = draw(st.one_of(st.none(), st.binary(min_size=16, max_size=16)))
        if kind == "write_after":  # a pipelined batch
            return [WRITE_AFTER.code, cid, seq,
                    WRITE_AFTER.build(draw(st.integers(0, 2**20)), ops)]
        return [WRITE.code, cid, seq, WRITE.build(ops)]
    if kind == "read":
        code, body = draw(_read())
        return [code, None, seq, body]
    cmd = PING if kind == "ping" else STATS
    return [cmd.code, None, seq, cmd.build()]


@st.composite
def _pool_request(draw: st.DrawFn) -> list[Any]:
    seq = draw(st.integers(0, 2**20))
    if draw(st.integers(0, 9)) == 0:
        return [PING.code, None, seq, PING.build()]
    code, body = draw(_read())
    shard = draw(st.sampled_from([0, 1, 0, 1, 2, -1]))
    return [READ.code, None, seq, READ.build(shard, code, body)]


def _paths(obj: Any, path: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield path + (i,)
            yield from _paths(item, path + (i,))


def _parent(obj: Any, path: tuple[int, ...]) -> list[Any]:
    for i in path[:-1]:
        obj = obj[i]
    return obj  # type: ignore[no-any-return]


@st.composite
def _mutated(draw: st.DrawFn, request: st.SearchStrategy[list[Any]]) -> list[bytes]:
    msg = draw(request)
    how = draw(st.sampled_from(["none", "flip", "truncate", "insert", "swap", "wrong",
                                "wrong", "drop", "multipart"]))
    if how in ("swap", "wrong", "drop"):
        paths = list(_paths(msg))
        path = draw(st.sampled_from(paths))
        parent = _parent(msg, path)
        if how == "swap":
            j = draw(st.integers(0, len(parent) - 1))
            parent[path[-1]], parent[j] = parent[j], parent[path[-1]]
        elif how == "wrong":
            parent[path[-1]] = draw(_wrong)
        else:
            del parent[path[-1]]
    frame = protocol.VERSION_BYTE + msgpack.packb(msg, use_bin_type=True)
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(frame) - 1))
            frame = frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    elif how == "truncate":
        frame = frame[:draw(st.integers(0, len(frame) - 1))]
    elif how == "insert":
        i = draw(st.integers(0, len(frame)))
        frame = frame[:i] + draw(st.binary(min_size=1, max_size=8)) + frame[i:]
    elif how == "multipart":
        return [frame, draw(st.binary(max_size=8))]
    return [frame]


_garbage = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: protocol.VERSION_BYTE + b),
    st.recursive(_wrong, lambda inner: st.lists(inner, max_size=4), max_leaves=8).map(
        lambda obj: protocol.VERSION_BYTE + msgpack.packb(obj, use_bin_type=True)),
).map(lambda frame: [frame])


def _batches(request: st.SearchStrategy[list[Any]]) -> st.SearchStrategy[list[list[bytes]]]:
    one = st.one_of(_mutated(request), _mutated(request), _mutated(request), _garbage)
    return st.lists(one, min_size=BATCH, max_size=BATCH)


class Target:
    """One live process under fuzz: a DEALER to it, and a check of every reply."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(endpoint)
        self.frames = 0
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.known_internal: tuple[str, ...] = ()
        self.known = 0

    def exchange(self, batch: list[list[bytes]]) -> None:
        expected = 0
        for parts in batch:
            self.sock.send_multipart(parts)
            expected += len(parts) == 1
        self.frames += len(batch)
        for _ in range(expected):
            reply = protocol.unpack_frame(self.sock.recv())  # raises if malformed
            assert len(reply) == 3, reply
            seq, status, body = reply
            assert type(seq) is int and type(status) is int
            if status == InternalError.code and self.known_internal and str(
                    body[0]).startswith(self.known_internal):
                self.known += 1  # a known, reported bug: not counted as an internal error
                continue
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status:
                self.errors += 1
                assert type(body) is list and len(body) == 2 and type(body[0]) is str, reply
                assert body[1] is None or type(body[1]) is str, reply
        assert not self.sock.poll(0), "more replies than single-frame requests"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Readers]]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"), shards=2, readers=1, sync=False)
    readers = Readers(cluster)
    try:
        cluster.start()
        readers.start()
        yield cluster, readers
    finally:
        readers.stop()
        cluster.stop()


_settings = settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))


def _still_serving(cluster: Cluster, readers: Readers) -> None:
    assert all(p.poll() is None for p in cluster.procs.values())
    assert all(p.poll() is None for p in readers.procs.values())
    for log in readers.logs.values():
        assert "Traceback" not in log.read_text(errors="replace"), log
    for log in cluster.logs.values():
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, log
    from lmshard.remote import ReaderPool

    with cluster.client() as c, ReaderPool(cluster.config) as pool:
        key = f"after-fuzz-{os.getpid()}"
        c.put("counters", key, 42)
        ct = c.table("counters")
        kb = ct.kenc(key)
        assert pool.request(ct.shard(key, kb), *GET.request_for(ct.tid, kb)) == ct.dumps(42)
        for s in range(cluster.config.shards):
            assert c.ping(s)["shard"] == s


def _fuzz(target: Target, requests: Any, live: tuple[Cluster, Readers]) -> None:
    """Send fuzzed batches of ``requests`` to ``target``; every frame gets answered or dropped,
    never an internal error, and both kinds of server still serve afterwards."""

    @_settings
    @given(_batches(requests))
    def run(batch: list[list[bytes]]) -> None:
        target.exchange(batch)

    try:
        run()
        assert target.frames >= EXAMPLES * BATCH and target.errors > target.frames // 4
        assert target.statuses.get(0, 0) > EXAMPLES  # valid requests got through too
        assert InternalError.code not in target.statuses, target.statuses
    finally:
        target.close()
    _still_serving(*live)


def test_owner_answers_or_drops_every_fuzzed_frame(live: tuple[Cluster, Readers]) -> None:
    cluster, _ = live
    _fuzz(Target(cluster.config.endpoint(0)), _owner_request(), live)


def test_reader_answers_or_drops_every_fuzzed_frame(live: tuple[Cluster, Readers]) -> None:
    cluster, _ = live
    with cluster.client() as c:  # something to find
        with c.batch() as b:
            for i in range(200):
                b.put("items", i, {"group": "a" if i % 2 else "b", "n": i})
                b.put("counters", f"c{i}", i)
    _fuzz(Target(reader_endpoint(cluster.config, 0)), _pool_request(), live)



def test_an_exact_lookup_of_an_empty_index_value_is_a_protocol_error(
        live: tuple[Cluster, Readers]) -> None:
    cluster, _ = live
    items = schema.tables["items"].table_id.bytes
    target = Target(cluster.config.endpoint(0))
    try:
        target.sock.send(LOOKUP.frame(None, 3, items, "by_group", b"", False))
        seq, status, body = protocol.unpack_frame(target.sock.recv())
    finally:
        target.close()
    assert status == ProtocolError.code, body


# -- the change feed ----------------------------------------------------------------------------


def _feed_exchange(sock: zmq.Socket[bytes], frames: list[bytes], quiet: float = 0.05
                   ) -> list[changes_wire.Decoded]:
    """Send one message on the change-feed socket; the answers (the first within 5 s, then
    each within ``quiet`` seconds of the one before), each a well-formed owner message."""
    sock.send_multipart(frames)
    out = []
    wait = 5.0
    while sock.poll(int(wait * 1000)):
        out.append(changes_wire.decode(sock.recv_multipart(), "owner", limit=None))
        wait = quiet
    return out


def _feed_socket(cluster: Cluster) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.config.changes_endpoint(0))
    return sock


def _watch_frame(wid: int, history: str, txn: int | None, credit: int = 4, n: int = 0,
                 tables: Any = None, prefix: Any = None) -> list[bytes]:
    return [changes_wire.pack(changes_wire.WATCH, wid, history, txn, n, tables, prefix, credit)]


def _error(answers: list[changes_wire.Decoded], code: int, wid: int = 0) -> str:
    assert len(answers) == 1, answers
    (a,) = answers
    assert a.message is changes_wire.ERROR and a.watch_id == wid, a
    assert a.values[0] == code, a
    return str(a.values[1])


def test_change_feed_answers_bad_input_with_typed_errors(
        live: tuple[Cluster, Readers]) -> None:
    from lmshard.errors import InvalidCursor, LimitExceeded

    cluster, _ = live
    with cluster.client() as c:
        c.put("counters", "feed-fuzz", 1)
        stats = c.stats()["shards"][0]["changes"]
    history, floor = stats["history"], stats["floor"]
    sock = _feed_socket(cluster)
    v = bytes([changes_wire.CHANGES_VERSION])
    try:
        for frames in ([b""], [b"\x00"], [b"\xff" * 40], [v], [v + b"\xc1"], [v + b"\x93"],
                       [v + msgpack.packb("watch")], [v + msgpack.packb([1])],
                       [v + msgpack.packb([1, 1])],  # WATCH without its fields
                       [v + msgpack.packb([999, 1])],  # no such message
                       [v + msgpack.packb([101, 1, history, 1, 0])],  # an owner's message
                       [v + msgpack.packb([3, -1])], [v + msgpack.packb([3, 2**31])],
                       [bytes([changes_wire.CHANGES_VERSION + 1]) + _watch_frame(
                           1, history, floor)[0][1:]],  # the wrong version byte
                       [*_watch_frame(1, history, floor), b"data"],  # WATCH takes no data
                       [b"a", b"b", b"c"],
                       _watch_frame(1, "xyz", floor),  # not a history
                       _watch_frame(1, history, floor, credit=0),
                       _watch_frame(1, history, floor, credit=changes_wire.MAX_CREDIT + 1),
                       _watch_frame(1, history, floor, credit=2**64 - 1),
                       _watch_frame(1, history, -1),
                       _watch_frame(1, history, floor, tables=[b"short"]),
                       [changes_wire.pack(changes_wire.CREDIT, 1, 0)],
                       [changes_wire.pack(changes_wire.CREDIT, 1, 2**40)]):
            _error(_feed_exchange(sock, frames), ProtocolError.code)
        _error(_feed_exchange(sock, [v + b"\x90" * (changes_wire.MAX_CONTROL_FRAME + 1)]),
               LimitExceeded.code)
        assert "prefix" in _error(_feed_exchange(sock, _watch_frame(
            2, history, floor, prefix=b"p")), ProtocolError.code, 2)
        assert "prefix" in _error(_feed_exchange(sock, _watch_frame(
            2, history, floor, tables=[TABLES[0].table_id.bytes, TABLES[1].table_id.bytes],
            prefix=b"p")), ProtocolError.code, 2)
        # a credit for a watch that does not exist (anymore)
        _error(_feed_exchange(sock, [changes_wire.pack(changes_wire.CREDIT, 9, 1)]),
               ProtocolError.code, 9)
        # a position ahead of the log: InvalidCursor; of another history: COMPACTED
        _error(_feed_exchange(sock, _watch_frame(3, history, 2**40)), InvalidCursor.code, 3)
        for bogus in ("0" * 16, "f" * 16):
            (a,) = _feed_exchange(sock, _watch_frame(4, bogus, floor))
            assert a.message is changes_wire.COMPACTED and a.watch_id == 4
            assert a.values[:2] == [history, floor]
        # a good watch from the oldest kept gets the log
        answers = _feed_exchange(sock, _watch_frame(5, history, floor, credit=4), quiet=0.5)
        assert answers[0].message is changes_wire.STARTED and answers[0].values == [
            history, floor, 0]
        assert all(a.message in (changes_wire.CHANGES, changes_wire.PROGRESS)
                   and a.watch_id == 5 for a in answers[1:]) and 1 <= len(answers) - 1 <= 4
        # a watch from the end, then credit past MAX_CREDIT: LimitExceeded, the watch is over
        answers = _feed_exchange(sock, _watch_frame(6, "", None, credit=4))
        assert answers[0].message is changes_wire.STARTED
        answers = _feed_exchange(sock, [changes_wire.pack(changes_wire.CREDIT, 6,
                                                          changes_wire.MAX_CREDIT)])
        _error([a for a in answers if a.message is not changes_wire.PROGRESS],
               LimitExceeded.code, 6)
        _error(_feed_exchange(sock, [changes_wire.pack(changes_wire.CREDIT, 6, 1)]),
               ProtocolError.code, 6)
    finally:
        sock.close()
    _feed_still_serving(cluster)


def _feed_still_serving(cluster: Cluster) -> None:
    """The owners still serve writes, and watches that see them."""
    with cluster.client() as c:
        w = c.watch("counters")
        key = f"feed-after-{os.getpid()}"
        c.put("counters", key, 7)
        change = w.get(10)
        assert change is not None and (change.key, change.value) == (key, 7)
        stats = c.stats()["shards"]
        assert sum(stats[s]["changes"]["bad_frames"] for s in stats) > 0
    for log in cluster.logs.values():
        assert "Traceback" not in log.read_text(errors="replace"), log


@st.composite
def _feed_request(draw: st.DrawFn) -> list[Any]:
    wid = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["watch", "watch", "credit", "cancel"]))
    if kind == "credit":
        return [changes_wire.CREDIT.code, wid, draw(st.integers(1, 40))]
    if kind == "cancel":
        return [changes_wire.CANCEL.code, wid]
    history = draw(st.sampled_from(["", "0" * 16, _FEED_HISTORY[0] or "0" * 16]))
    txn = draw(st.one_of(st.none(), st.integers(0, 2**20)))
    table = draw(st.sampled_from(TABLES))
    tables = draw(st.sampled_from([None, [table.table_id.bytes]]))
    prefix = draw(st.one_of(st.none(), st.binary(max_size=8))) if tables else None
    return [changes_wire.WATCH.code, wid, history, txn, draw(st.integers(0, 3)), tables,
            prefix, draw(st.integers(1, 16))]


_FEED_HISTORY: list[str] = [""]


@st.composite
def _feed_mutated(draw: st.DrawFn) -> list[bytes]:
    frames = draw(_mutated(_feed_request()))
    frames[0] = bytes([changes_wire.CHANGES_VERSION]) + frames[0][1:]
    return frames


def test_change_feed_answers_fuzzed_frames_with_owner_messages(
        live: tuple[Cluster, Readers]) -> None:
    cluster, _ = live
    with cluster.client() as c:
        _FEED_HISTORY[0] = c.stats()["shards"][0]["changes"]["history"]
    sock = _feed_socket(cluster)
    counts: dict[str, int] = {}

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(_feed_mutated(), _feed_mutated(), _garbage), min_size=20,
                    max_size=20))
    def run(batch: list[list[bytes]]) -> None:
        for frames in batch:
            sock.send_multipart(frames)
        while sock.poll(100):
            a = changes_wire.decode(sock.recv_multipart(), "owner", limit=None)
            counts[a.message.name] = counts.get(a.message.name, 0) + 1
            if a.message is changes_wire.ERROR:
                assert a.values[0] != InternalError.code, a

    try:
        run()
        for wid in range(1, 9):
            sock.send(changes_wire.pack(changes_wire.CANCEL, wid))
    finally:
        sock.close()
    assert counts.get("ERROR", 0) > 100 and counts.get("STARTED", 0) > 10, counts
    _feed_still_serving(cluster)
