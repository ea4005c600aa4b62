"""The owner's unix stream socket (``shard.unix_socket``): the ROUTER's frames, each behind its
length, served by the same code: one (client id, seq) applied once whichever way it came, replies
in order, a client that does not read never holds the owner up, bad input drops the connection
alone."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from lmshard import protocol
from lmshard.protocol import PING, WRITE
from lmshard.unix_wire import HEADER, pack, unix_path
from tests.cluster import Cluster, dealer
from tests.schemas import COUNTERS_ID


def _connect(cluster: Cluster, shard: int) -> socket.socket:
    path = unix_path(cluster.config.endpoint(shard))
    assert path is not None and os.path.exists(path), path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "the owner closed the connection"
        buf += chunk
    return buf


def _reply(s: socket.socket) -> list:
    (size,) = HEADER.unpack(_recv_exact(s, HEADER.size))
    return protocol.unpack_frame(_recv_exact(s, size))


def _incr(cluster: Cluster, key: str, delta: int = 5) -> tuple[int, list]:
    with cluster.client() as c:
        ct = c.table("counters")
        kb = ct.kenc(key)
        return ct.shard(key, kb), protocol.op(protocol.OP_INCR, uuid.UUID(COUNTERS_ID).bytes,
                                              kb, delta)


def test_a_batch_sent_either_way_is_applied_once(cluster: Cluster) -> None:
    shard, op = _incr(cluster, "both-ways")
    cid = os.urandom(16)
    frame = WRITE.frame(cid, 7, [op])
    s = _connect(cluster, shard)
    s.sendall(pack(frame))
    first = _reply(s)
    assert first[0] == 7 and first[1] == 0 and first[2][1] == [5]
    # The same (client id, seq) again through the ROUTER, then the unix socket: the kept reply.
    zsock = dealer(cluster, shard)
    zsock.send(frame)
    assert protocol.unpack_frame(zsock.recv()) == first
    s.sendall(pack(frame))
    assert _reply(s) == first
    s.sendall(pack(WRITE.frame(cid, 8, [op])))
    assert _reply(s)[2][1] == [10]
    with cluster.client() as c:
        assert c.get("counters", "both-ways") == 10
    s.close()
    zsock.close()


def test_requests_in_one_send_and_in_pieces_are_answered_in_order(cluster: Cluster) -> None:
    shard, op = _incr(cluster, "pieces", 1)
    cid = os.urandom(16)
    s = _connect(cluster, shard)
    frames = [pack(WRITE.frame(cid, seq, [op])) for seq in range(1, 21)]
    s.sendall(b"".join(frames[:10]))  # ten requests in one send
    data = b"".join(frames[10:])
    for i in range(len(data)):  # and ten a byte at a time
        s.sendall(data[i:i + 1])
    replies = [_reply(s) for _ in range(20)]
    assert [r[0] for r in replies] == list(range(1, 21))
    assert [r[2][1] for r in replies] == [[n] for n in range(1, 21)]
    s.close()


def test_a_client_that_does_not_read_holds_no_one_up(cluster: Cluster) -> None:
    s = _connect(cluster, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    n = 20_000  # far more replies than the socket buffers hold
    s.sendall(b"".join(pack(PING.frame(None, seq)) for seq in range(1, n + 1)))
    zsock = dealer(cluster, 0)
    deadline = time.monotonic() + 10
    answered = 0
    while time.monotonic() < deadline and answered < 50:
        t = time.monotonic()
        zsock.send(PING.frame(None, 1))
        assert protocol.unpack_frame(zsock.recv())[1] == 0
        assert time.monotonic() - t < 2, "the owner was held up by a client that does not read"
        answered += 1
    # The slow client gets every reply, in order, once it reads.
    seqs = [_reply(s)[0] for _ in range(n)]
    assert seqs == list(range(1, n + 1))
    s.close()
    zsock.close()


def test_a_bad_length_drops_that_connection_alone(cluster: Cluster) -> None:
    bad = _connect(cluster, 0)
    good = _connect(cluster, 0)
    bad.sendall(HEADER.pack(2**31) + b"x" * 100)
    bad.settimeout(5)
    assert bad.recv(100) == b""  # closed by the owner
    good.sendall(pack(PING.frame(None, 3)))
    assert _reply(good)[:2] == [3, 0]
    good.sendall(pack(b"\x01\xc1"))  # a frame that is not msgpack: a typed error, kept open
    assert _reply(good)[1] != 0
    good.sendall(pack(PING.frame(None, 4)))
    assert _reply(good)[:2] == [4, 0]
    good.close()
    bad.close()


def test_the_socket_follows_the_owner_and_the_setting(tmp_path: Path) -> None:
    on = Cluster(tmp_path / "on", shards=1)
    path = unix_path(on.config.endpoint(0))
    assert path is not None
    on.start()
    try:
        assert os.path.exists(path)
    finally:
        on.stop()
    assert not os.path.exists(path)  # a clean stop removes it
    off = Cluster(tmp_path / "off", shards=1, unix_socket=False)
    off.start()
    try:
        off_path = unix_path(off.config.endpoint(0))
        assert off_path is not None and not os.path.exists(off_path)
        with off.client() as c:
            c.put("counters", "k", 1)
            assert c.get("counters", "k") == 1
    finally:
        off.stop()
