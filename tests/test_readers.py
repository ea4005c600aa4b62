"""The reader pool: real reader processes serving every read command for every shard."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import lmshard
from lmshard import protocol
from lmshard.config import ConfigError, make_config
from lmshard.errors import LimitExceeded, ProtocolError, SchemaMismatch, ShardUnavailable
from lmshard.protocol import COUNT, GET, GET_MANY, LOOKUP, PING, READ, SCAN, STATS, WRITE
from lmshard.remote import ReaderPool, reader_endpoint, reader_endpoints
from tests.cluster import REPO, Cluster, env_for_children
from tests.schemas import BLOBS_ID, COUNTERS_ID, ITEMS_ID

BLOBS, COUNTERS, ITEMS = (uuid.UUID(x).bytes for x in (BLOBS_ID, COUNTERS_ID, ITEMS_ID))
GET_ONE = GET.request_for(BLOBS, (1).to_bytes(8, "big"))
"""(code, body) of a get of blobs row 1."""
COUNT_ALL = COUNT.request_for(BLOBS, None, None)
"""(code, body) of a count of every blobs row."""


class Readers:
    """``lmshardd readers --index I`` processes for a Cluster's config; always stopped."""

    def __init__(self, cluster: Cluster, prefix: list[str] | None = None,
                 args: list[str] | None = None) -> None:
        self.cluster = cluster
        self.prefix = prefix or []
        self.args = args or []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}

    def start(self, index: int | None = None, wait: bool = True) -> None:
        indexes = range(self.cluster.config.readers) if index is None else [index]
        for i in indexes:
            self.logs[i] = self.cluster.base / f"reader-{i:02d}.log"
            self.procs[i] = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "lmshardd.main", "-c",
                 str(self.cluster.config_path), "readers", "--index", str(i), *self.args],
                stdout=open(self.logs[i], "ab"), stderr=subprocess.STDOUT, cwd=REPO,
                env=env_for_children(),
            )
        if wait:
            self.wait_ready(indexes)

    def wait_ready(self, indexes: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with ReaderPool(self.cluster.config, timeout_ms=200, retries=0) as pool:
            while True:
                for i in indexes:
                    if self.procs[i].poll() is not None:
                        raise RuntimeError(f"reader {i} exited {self.procs[i].returncode}: "
                                           f"{self.log(i)[-2000:]}")
                health = pool.ping_each(200)
                if all(health[i] is not None for i in indexes):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"readers not ready: {health}")
                time.sleep(0.05)

    def log(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.procs[index].send_signal(sig)
        self.procs[index].wait(timeout=30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def pool_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Readers]]:
    """Two shard owners with data, two readers; shared by the read-only tests below."""
    cluster = Cluster(tmp_path_factory.mktemp("pool"), shards=2, readers=2, sync=False)
    readers = Readers(cluster)
    try:
        cluster.start()
        with cluster.client() as c:
            with c.batch() as b:
                for i in range(500):
                    b.put("blobs", i, b"v%d" % i)
                for i in range(60):
                    b.put("items", i, {"group": f"g{i % 3}", "n": i})
                b.put("counters", "x" * 511, 1)  # the longest key LMDB takes
                b.put("counters", "x" * 510 + "y", 2)
                b.put("counters", "z", 3)
        readers.start()
        yield cluster, readers
    finally:
        readers.stop()
        cluster.stop()


def _shard(cluster: Cluster, table: str, key: Any) -> tuple[int, bytes]:
    with cluster.client() as c:
        ct = c.table(table)
        kb = ct.kenc(key)
        return ct.shard(key, kb), kb


def test_pool_serves_every_read_command(pool_cluster: tuple[Cluster, Readers]) -> None:
    cluster, _ = pool_cluster
    with ReaderPool(cluster.config) as pool, cluster.client() as c:
        shard, kb = _shard(cluster, "blobs", 7)
        assert pool.request(shard, *GET.request_for(BLOBS, kb)) == b"v7"
        missing = (10**6).to_bytes(8, "big")
        assert pool.request(shard, *GET.request_for(BLOBS, missing)) is None
        keys = [i.to_bytes(8, "big") for i in range(500)]
        owned = [k for k in keys if c.slot_map.shard_of(k) == shard]
        got = pool.request(shard, *GET_MANY.request_for(BLOBS, owned))
        assert got == [b"v%d" % int.from_bytes(k, "big") for k in owned]
        rows = sorted((k, v) for s in (0, 1) for k, v in pool.scan(s, BLOBS))
        assert [int.from_bytes(k, "big") for k, _ in rows] == list(range(500))
        lo, hi = (100).to_bytes(8, "big"), (130).to_bytes(8, "big")
        total = sum(pool.request(s, *COUNT.request_for(BLOBS, lo, hi)) for s in (0, 1))
        assert total == 30 and sum(pool.request(s, *COUNT_ALL) for s in (0, 1)) == 500
        g1 = LOOKUP.request_for(ITEMS, "by_group", _iv("g1"), False)
        items_shard = {s: pool.request(s, *g1) for s in (0, 1)}
        found = sorted(int.from_bytes(k, "big") for rows in items_shard.values() for k, _ in rows)
        assert found == [i for i in range(60) if i % 3 == 1]
        results = pool.requests([(0, *COUNT_ALL), (1, *COUNT_ALL),
                                 (0, *GET.request_for(b"\x00" * 16, kb))])
        assert results[0] + results[1] == 500
        assert isinstance(results[2], lmshard.UnknownTable)


def _iv(value: Any) -> bytes:
    from lmshard.keys import encode_index_value

    return encode_index_value(value)


def test_scans_come_in_pages_forward_and_reverse(pool_cluster: tuple[Cluster, Readers]) -> None:
    cluster, _ = pool_cluster
    with ReaderPool(cluster.config) as pool:
        for s in (0, 1):
            whole = list(pool.scan(s, BLOBS))
            assert list(pool.scan(s, BLOBS, page=7)) == whole
            assert list(pool.scan(s, BLOBS, reverse=True, page=5)) == whole[::-1]
            lo, hi = whole[10][0], whole[40][0]
            assert list(pool.scan(s, BLOBS, lo, hi, page=4)) == whole[10:40]
            assert list(pool.scan(s, BLOBS, lo, hi, reverse=True, page=3)) == whole[10:40][::-1]
        # A page that ends on a key of LMDB's maximum length still continues past it.
        counters = sorted(kv for s in (0, 1) for kv in pool.scan(s, COUNTERS, page=1))
        assert [len(k) for k, _ in counters] == [511, 511, 1]


def test_requests_are_spread_over_the_readers(pool_cluster: tuple[Cluster, Readers]) -> None:
    cluster, _ = pool_cluster

    def served(pool: ReaderPool) -> list[int]:
        health = pool.ping_each()
        return [health[i]["requests"] for i in (0, 1)]  # type: ignore[index]

    with ReaderPool(cluster.config) as probe:
        before = served(probe)
        pools = [ReaderPool(cluster.config) for _ in range(16)]  # 16 clients, random homes
        for pool in pools:
            for i in range(10):
                pool.request(i % 2, *GET.request_for(BLOBS, i.to_bytes(8, "big")))
            pool.close()
        after = served(probe)
        per_reader = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(per_reader) >= 160 and min(per_reader) >= 20, per_reader
        # The parts of one call go to different readers, served side by side.
        before = after
        probe.requests([(0, *COUNT_ALL), (1, *COUNT_ALL)])
        after = served(probe)
        assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]  # +1 ping each


def test_bad_requests_get_typed_errors_and_the_reader_keeps_serving(
        pool_cluster: tuple[Cluster, Readers]) -> None:
    cluster, readers = pool_cluster
    ep = reader_endpoint(cluster.config, 1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(ep)
    op = protocol.op(protocol.OP_PUT, COUNTERS, b"k", b"v")

    def read(shard: Any, cmd: protocol.Command, *args: Any) -> bytes:
        return READ.frame(None, 1, shard, cmd.code, cmd.build(*args))

    key = b"k" * 8
    bad = [  # raw bytes for the frame layout itself, then bodies built by the commands
        b"",
        b"\x02" + msgpack.packb([15, None, 1, [0, 10, [BLOBS, b"k"]]]),  # wrong version
        b"\x01\xc1",
        b"\x01" + msgpack.packb([15, None, 1]),
        WRITE.frame(None, 1, [op]),  # a write: owners only
        STATS.frame(None, 1),  # stats: owners only
        read(0, WRITE, [op]),  # a write inside a read
        read(2, GET, BLOBS, key),  # no shard 2
        read(-1, GET, BLOBS, key),
        read(True, GET, BLOBS, key),
        read(0, GET, b"x" * 16, b"k"),  # unknown table
        read(0, GET, COUNTERS, b"k" * 600),  # too long
        read(0, GET_MANY, BLOBS, [key] * 100_001),
        read(0, SCAN, BLOBS, None, None, False, 10**9),
        read(0, SCAN, BLOBS, None, None, 1, 10),
        read(0, LOOKUP, ITEMS, "nope", b"x", False),
        read(0, LOOKUP, ITEMS, "by_group", b"", False),
        read(0, COUNT, BLOBS, "lo", None),
        protocol.pack_request(PING.code, None, 1, "a body"),
    ]
    for frame in bad:
        sock.send(frame)
        seq, status, body = protocol.unpack_frame(sock.recv())
        assert status >= ProtocolError.code or status in (11, 12), (frame[:60], status, body)
        assert isinstance(body[0], str) and body[0]
    sock.send_multipart([b"a", b"b", b"c"])  # not our framing: dropped
    sock.send(READ.frame(None, 77, 0, *COUNT_ALL))
    seq, status, body = protocol.unpack_frame(sock.recv())
    assert (seq, status) == (77, 0) and body > 0
    sock.close()
    assert readers.procs[1].poll() is None


def test_a_killed_reader_costs_a_retry_not_an_error(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=1, readers=2, sync=False)
    readers = Readers(cluster)
    try:
        cluster.start()
        with cluster.client() as c:
            c.put("blobs", 1, b"one")
        readers.start()
        with ReaderPool(cluster.config, timeout_ms=500, retries=3) as pool:
            assert pool.request(0, *GET_ONE) == b"one"
            readers.kill(0)
            for _ in range(20):  # half of these would have gone to reader 0
                assert pool.request(0, *GET_ONE) == b"one"
            # A reader that takes a request and never answers (stopped): the request is sent
            # again to the next reader after the timeout, which becomes the client's home.
            stalled = ReaderPool(cluster.config, timeout_ms=300, retries=2)
            stalled.request(0, *COUNT_ALL)  # connected
            readers.start(0)
            stalled._conn().home = 1
            os.kill(readers.procs[1].pid, signal.SIGSTOP)
            try:
                assert stalled.request(0, *GET_ONE) == b"one"
                assert stalled.counters["timeouts"] == 1 and stalled._conn().home == 0
                parts = [(0, *COUNT_ALL)] * 2  # one of them to the stopped one
                assert stalled.requests(parts) == [1, 1]
            finally:
                os.kill(readers.procs[1].pid, signal.SIGCONT)
                stalled.close()
            readers.kill(0)
            readers.kill(1)
            with ReaderPool(cluster.config, timeout_ms=100, retries=1) as down, \
                    pytest.raises(ShardUnavailable, match="reader pool"):
                down.request(0, *GET_ONE)
            readers.start(0)  # back: the same pool object reconnects
            assert pool.request(0, *GET_ONE) == b"one"
    finally:
        readers.stop()
        cluster.stop()


def test_readers_may_start_before_the_owners(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=1, readers=1, sync=False)
    readers = Readers(cluster)
    try:
        readers.start()
        with ReaderPool(cluster.config, timeout_ms=2000, retries=0) as pool:
            with pytest.raises(ShardUnavailable, match="cannot open shard 0"):
                pool.request(0, *GET_ONE)
            cluster.start()
            with cluster.client() as c:
                c.put("blobs", 1, b"one")
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert pool.request(0, *GET_ONE) == b"one"
                    break
                except ShardUnavailable:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
    finally:
        readers.stop()
        cluster.stop()


def _readers_exit(cluster: Cluster, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "lmshardd.main", "-c", str(cluster.config_path), "readers",
         *args], capture_output=True, text=True, cwd=REPO, env=env_for_children(), timeout=60)
    return proc.returncode, proc.stderr


def test_readers_command_line_is_checked(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "a", shards=1, readers=2)
    try:
        code, err = _readers_exit(cluster, "--index", "2")
        assert code == 2 and "--index 2 is not in 0..1" in err
        code, err = _readers_exit(cluster, "--index", "x")
        assert code == 2 and "invalid int value" in err
    finally:
        cluster.stop()
    off = Cluster(tmp_path / "b", shards=1, readers=0)
    try:
        code, err = _readers_exit(off)
        assert code == 2 and "readers.count is 0" in err
    finally:
        off.stop()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pinned_readers_keep_every_thread_on_one_cpu(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=1, readers=2, sync=False)
    readers = Readers(cluster, args=["--pin-cpu"])
    try:
        cluster.start()
        with cluster.client() as c:
            c.put("blobs", 1, b"one")
        readers.start()
        cpus = sorted(os.sched_getaffinity(0))
        for i, proc in readers.procs.items():
            # The reader's own thread and ZeroMQ's (others, such as a BLAS pool started when
            # the schema imported numpy, serve no request and may run anywhere).
            task = Path(f"/proc/{proc.pid}/task")
            threads = [int(t.name) for t in task.iterdir() if int(t.name) == proc.pid
                       or (t / "comm").read_text().startswith("ZMQbg/IO")]
            assert len(threads) >= 2
            for tid in threads:
                assert os.sched_getaffinity(tid) == {cpus[i % len(cpus)]}
        with ReaderPool(cluster.config) as pool:
            parts = [(0, *GET_ONE)] * 2  # one to each reader
            assert pool.requests(parts) == [b"one", b"one"]
    finally:
        readers.stop()
        cluster.stop()


def test_reader_endpoints_are_derived_and_checked(tmp_path: Path) -> None:
    cfg = make_config(base_dir=tmp_path, readers=3, reader_endpoint="tcp://10.0.0.5:5800")
    assert reader_endpoints(cfg) == ["tcp://10.0.0.5:5800", "tcp://10.0.0.5:5801",
                                     "tcp://10.0.0.5:5802"]
    cfg = make_config(base_dir=tmp_path, readers=2, reader_endpoint="tcp://[::1]:7000")
    assert reader_endpoints(cfg)[1] == "tcp://[::1]:7001"
    cfg = make_config(base_dir=tmp_path, readers=2, run_dir="/r")
    assert reader_endpoints(cfg) == ["ipc:///r/readers.sock", "ipc:///r/readers-1.sock"]
    # Readers on 5800 and the monitor on 5801: reader 1 would take the monitor's port. The
    # config refuses it when it is made (tests/test_config.py), and so does reader_endpoints
    # for a Config that did not come through make_config or load_config.
    with pytest.raises(ConfigError, match="reader 1's endpoint tcp://10.0.0.5:5801 is also "
                       "used by monitor.endpoint"):
        make_config(base_dir=tmp_path, readers=4, reader_endpoint="tcp://10.0.0.5:5800",
                    monitor_endpoint="tcp://10.0.0.5:5801")
    cfg = make_config(base_dir=tmp_path, readers=1, reader_endpoint="tcp://10.0.0.5:5800",
                      monitor_endpoint="tcp://10.0.0.5:5801")
    with pytest.raises(ConfigError, match="reader 1's endpoint tcp://10.0.0.5:5801 is also "
                       "used by monitor.endpoint"):
        reader_endpoints(dataclasses.replace(cfg, readers=4))
    with pytest.raises(ConfigError, match="past port 65535"):
        make_config(base_dir=tmp_path, readers=2, reader_endpoint="tcp://10.0.0.5:65535")
    cfg = make_config(base_dir=tmp_path, readers=1, reader_endpoint="tcp://10.0.0.5:65535")
    with pytest.raises(ConfigError, match="past port 65535"):
        reader_endpoints(dataclasses.replace(cfg, readers=2))
    cfg = make_config(base_dir=tmp_path, readers=0)
    with pytest.raises(ConfigError, match="readers.count is 0"):
        ReaderPool(cfg)


def test_a_bad_or_stale_reply_is_asked_again_not_raised(tmp_path: Path) -> None:
    """ReaderPool.request against a ROUTER that answers each key's first request wrongly:
    an undecodable frame, a reply to another sequence number, an error with a malformed body,
    a reply of two fields.
    Each is dropped and the request resent (reads are idempotent); the caller sees the answer,
    no timeout is counted, and the requests that follow are answered in order."""
    ep = f"ipc://{tmp_path}/reader.sock"
    cfg = make_config(base_dir=tmp_path, readers=1, reader_endpoint=ep, timeout_ms=3000,
                      retries=1)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ep)
    first = {
        b"garbage": lambda seq: b"\x01\xc1",  # 0xc1: never valid msgpack
        b"stale": lambda seq: protocol.pack_reply(seq + 1000, 0, b"someone else's"),
        b"bad error": lambda seq: protocol.pack_reply(seq, 40, "not [message, hint]"),
        b"short": lambda seq: protocol.VERSION_BYTE + msgpack.packb([seq, 0]),  # 2 fields
    }
    seen: set[bytes] = set()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, frame = router.recv_multipart()
            _code, _cid, seq, (_shard, _rcode, (_tid, key)), *_ = protocol.unpack_request(frame)
            wrong = first.get(key) if key not in seen else None
            seen.add(key)
            router.send_multipart([ident, wrong(seq) if wrong else
                                   protocol.pack_reply(seq, 0, b"value of " + key)])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with ReaderPool(cfg) as pool:
            for key in (b"ok", *first, b"after", b"and after"):
                assert pool.request(0, *GET.request_for(BLOBS, key)) == b"value of " + key
            assert pool.counters["timeouts"] == 0
    finally:
        stop.set()
        server.join()
        router.close()
        ctx.term()


# -- in-process: the Reader's answer() without sockets ------------------------------------------


@pytest.fixture
def reader_config(tmp_path: Path) -> Any:
    from lmshardd.owner import ShardOwner

    cfg = make_config(base_dir=tmp_path, shards=2, schema="tests.schemas:schema",
                      python_path=[str(REPO)], data_dir=str(tmp_path / "data"),
                      run_dir=str(tmp_path / "run"), readers=1, sync=False)
    for shard in (0, 1):
        owner = ShardOwner(cfg, shard)
        with owner.store.write() as w:
            for i in range(50):
                w.put("blobs", i, b"x" * 1000)
        owner.close()
    return cfg


def _read(reader: Any, shard: int, request: tuple[int, Any]) -> list[Any]:
    return protocol.unpack_frame(reader.answer(READ.frame(None, 5, shard, *request)))


def test_a_reply_over_the_frame_limit_is_refused(reader_config: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lmshardd.readers import Reader

    reader = Reader(reader_config, 0)
    keys = [i.to_bytes(8, "big") for i in range(50)]
    seq, status, body = _read(reader, 0, GET_MANY.request_for(BLOBS, keys))
    assert status == 0
    monkeypatch.setattr(protocol, "MAX_FRAME_SIZE", 20_000)
    seq, status, body = _read(reader, 0, GET_MANY.request_for(BLOBS, keys))
    assert (seq, status) == (5, LimitExceeded.code) and "over the frame limit" in body[0]
    reader.close()


def test_a_reader_refuses_a_shard_directory_of_another_shard(reader_config: Any) -> None:
    from lmshardd.readers import Reader

    shutil.rmtree(reader_config.shard_dir(1))
    shutil.copytree(reader_config.shard_dir(0), reader_config.shard_dir(1))
    reader = Reader(reader_config, 0)
    assert _read(reader, 0, COUNT_ALL)[1:] == [0, 50]
    seq, status, body = _read(reader, 1, COUNT_ALL)
    assert status == SchemaMismatch.code and "holds shard 0" in body[0]
    reader.close()


def test_a_client_without_local_files_reads_through_the_pool(
        pool_cluster: tuple[Cluster, Readers]) -> None:
    cluster, _ = pool_cluster
    with cluster.client(local_reads=False) as remote, cluster.client() as local, \
            ReaderPool(cluster.config) as pool:
        before = sum(h["requests"] for h in pool.ping_each().values() if h)
        assert remote.get("blobs", 7) == local.get("blobs", 7) == b"v7"
        keys = list(range(0, 600, 7))
        assert remote.get_many("blobs", keys) == local.get_many("blobs", keys)
        assert list(remote.scan("blobs", start=20, end=300)) == list(
            local.scan("blobs", start=20, end=300))
        assert list(remote.scan("blobs", reverse=True, limit=5)) == list(
            local.scan("blobs", reverse=True, limit=5))
        assert list(remote.scan("counters")) == list(local.scan("counters"))
        assert remote.count("blobs") == local.count("blobs") == 500
        assert remote.count("blobs", start=100, end=130) == 30
        assert remote.lookup("items", "by_group", "g2") == local.lookup("items", "by_group", "g2")
        after = sum(h["requests"] for h in pool.ping_each().values() if h)
        assert after - before >= 8  # the reads went to the readers, not the owners
        assert remote.ping(0)["shard"] == 0  # pings still go to the owner
