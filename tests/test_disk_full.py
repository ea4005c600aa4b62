"""The data directory's filesystem fills up: real owners on a small tmpfs, a ballast file that
takes the space, writes refused with DiskFull, reads answered, nothing acked lost, and the same
owner process taking writes again once the ballast is gone."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

import lmshard
from lmshard import protocol
from lmshard.errors import DiskFull, StoreFull
from lmshard.protocol import PING, WRITE
from tests.cluster import Cluster
from tests.faults.disk import Ballast, MiB, MountNotPermitted, mount_small_tmpfs
from tests.schemas import BLOBS_ID, COUNTERS_ID
from tests.test_readers import Readers

pytestmark = pytest.mark.slow

KiB = 2**10
FS_SIZE = 16 * MiB
"""The data directory's filesystem: a tmpfs this big."""
SHARDS = 2


@dataclass
class FullDisk:
    """Owners and a reader on a small tmpfs, the ballast to fill it, and what was acked."""

    cluster: Cluster
    data: Path
    ballast: Ballast
    rows: dict[int, bytes] = field(default_factory=dict)
    """blobs rows acked: key -> value."""
    counts: dict[str, int] = field(default_factory=dict)
    """counters acked: key -> the sum of acked increments."""
    refused: set[int] = field(default_factory=set)
    """blobs keys of writes refused with DiskFull: none of them may be stored."""

    def keys(self, table: str, shard: int, n: int, start: int = 0) -> list[Any]:
        return keys_on(self.cluster, table, shard, n, start)

    def check_reads(self) -> None:
        """Every acked row and counter, read from the map and through the reader pool; no
        refused row."""
        with self.cluster.client() as local, self.cluster.client(local_reads=False) as remote:
            for c in (local, remote):
                keys = sorted(self.rows) + sorted(self.refused)
                got = c.get_many("blobs", keys)
                assert got == [self.rows.get(k) for k in keys]
                assert c.count("blobs") == len(self.rows)
                for key, total in self.counts.items():
                    assert c.get("counters", key) == total


def small_filesystem(stack: ExitStack, path: Path, size: int) -> Path:
    """A tmpfs of ``size`` bytes on ``path`` until ``stack`` closes; the test is skipped where
    mounts are not permitted."""
    try:
        return stack.enter_context(mount_small_tmpfs(path, size))
    except MountNotPermitted as exc:
        pytest.skip(f"needs a tmpfs mount for a filesystem that fills up: {exc}")


def keys_on(cluster: Cluster, table: str, shard: int, n: int, start: int = 0) -> list[Any]:
    """``n`` keys of ``table`` (``counters``: str keys, else ints) from ``start`` up that live
    on ``shard``."""
    with cluster.client() as c:
        ct = c.table(table)
        found: list[Any] = []
        k = start
        while len(found) < n:
            key = f"c{k}" if table == "counters" else k
            if ct.shard(key, ct.kenc(key)) == shard:
                found.append(key)
            k += 1
        return found


@pytest.fixture
def full_disk(short_dir: Path) -> Iterator[FullDisk]:
    """Two owners (and one reader) whose data_dir is a 16 MiB tmpfs; started, always stopped
    and unmounted."""
    with ExitStack() as stack:
        data = small_filesystem(stack, short_dir / "data", FS_SIZE)
        # map_size: the default (64 MiB) is more than the filesystem, so the disk fills first
        cluster = Cluster(short_dir, shards=SHARDS, readers=1)
        readers = Readers(cluster)
        stack.callback(cluster.stop)  # before the unmount: the owners map files there
        stack.callback(readers.stop)
        cluster.start()
        readers.start()
        ballast = stack.enter_context(Ballast())
        yield FullDisk(cluster, data, ballast)


def blob(key: int, size: int) -> bytes:
    return key.to_bytes(8, "big") * (size // 8)


def put_until_refused(disk: FullDisk, c: lmshard.Client, size: int) -> None:
    """Put ``size``-byte rows, over both shards, until each shard has refused one with
    DiskFull; the ones acked go to ``disk.rows``."""
    refused: set[int] = set()
    keys = {s: iter(disk.keys("blobs", s, 200, start=10_000)) for s in range(SHARDS)}
    for _ in range(200):
        for s in set(range(SHARDS)) - refused:
            key = next(keys[s])
            value = blob(key, size)
            try:
                c.put("blobs", key, value)
            except DiskFull as exc:
                assert f"shard {s} " in exc.message and "full" in exc.message, exc.message
                refused.add(s)
                disk.refused.add(key)
            else:
                disk.rows[key] = value
        if refused == set(range(SHARDS)):
            return
    raise AssertionError(f"shards {set(range(SHARDS)) - refused} never refused a write")


def test_a_full_disk_refuses_writes_and_the_same_owner_takes_them_again_once_freed(
    full_disk: FullDisk,
) -> None:
    disk, cluster = full_disk, full_disk.cluster
    pids = [cluster.pid(s) for s in range(SHARDS)]
    counters = {s: disk.keys("counters", s, 1)[0] for s in range(SHARDS)}
    with cluster.client() as c:
        for k in range(40):  # acked with room to spare
            with c.batch() as b:
                b.put("blobs", k, blob(k, 16 * KiB))
                b.incr("counters", counters[k % SHARDS], 1)
            disk.rows[k] = blob(k, 16 * KiB)
            disk.counts[counters[k % SHARDS]] = disk.counts.get(counters[k % SHARDS], 0) + 1

        disk.ballast.fill(disk.data, leave_bytes=MiB)
        put_until_refused(disk, c, 128 * KiB)

        # While full: every batch that needs room is refused whole, at once (DiskFull is an
        # answer; a timeout would be ShardUnavailable).
        for s in range(SHARDS):
            big, *small = disk.keys("blobs", s, 4, start=20_000)
            for _ in range(3):
                with pytest.raises(DiskFull, match=f"shard {s} takes no writes"):
                    with c.batch() as b:
                        b.put("blobs", big, blob(big, MiB))
                        for k in small:
                            b.put("blobs", k, b"small")
                        b.incr("counters", counters[s], 1)
            with pytest.raises(DiskFull):
                c.put("blobs", big, blob(big, MiB))
            disk.refused.update([big, *small])
            health = c.ping(s)
            assert health["pid"] == pids[s]
            assert health["disk_full"] is not None
            assert health["disk_full"]["refused"] >= 4
            assert "full" in health["disk_full"]["error"]
        disk.check_reads()
        assert all(cluster.procs[s].poll() is None for s in range(SHARDS))

        disk.ballast.release()
        for s in range(SHARDS):
            big = disk.keys("blobs", s, 1, start=30_000)[0]
            c.put("blobs", big, blob(big, MiB))
            disk.rows[big] = blob(big, MiB)
            c.incr("counters", counters[s], 1)
            disk.counts[counters[s]] += 1
            health = c.ping(s)
            assert health["pid"] == pids[s] and health["disk_full"] is None
    disk.check_reads()
    assert [cluster.pid(s) for s in range(SHARDS)] == pids
    assert all(cluster.procs[s].poll() is None for s in range(SHARDS))
    log = cluster.logs[0].read_text()
    assert "shard 0 takes no writes while the filesystem" in log
    assert "shard 0 takes writes again" in log


def resend_beside_a_refused_write(cluster: Cluster, fill: Callable[[], object]) -> None:
    """The ack of a batch was lost, then ``fill`` left shard 0 no room, and the resent batch
    shares a group commit with a write that needs room: the group is refused, but the resent
    batch was applied before, so it is answered as applied (an error would say it was not)."""
    counter = keys_on(cluster, "counters", 0, 1)[0]
    big = keys_on(cluster, "blobs", 0, 1, start=40_000)[0]
    with cluster.client() as c:
        incr = protocol.op(protocol.OP_INCR, uuid.UUID(COUNTERS_ID).bytes,
                           c.table("counters").kenc(counter), 5)
        # small enough to arrive whole at once, too big for pages freed inside the file
        put = protocol.op(protocol.OP_PUT, uuid.UUID(BLOBS_ID).bytes,
                          c.table("blobs").kenc(big), blob(big, 64 * KiB))
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(3):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(cluster.config.endpoint(0))
        sock.send(PING.frame(None, 1))  # connected before the owner is paused
        sock.recv()
        socks.append(sock)
    first_sock, resend_sock, big_sock = socks
    try:
        cid = os.urandom(16)
        first_sock.send(WRITE.frame(cid, 7, [incr]))
        first = protocol.unpack_frame(first_sock.recv())
        assert first[1] == 0
        fill()
        os.kill(cluster.pid(0), signal.SIGSTOP)  # both requests wait, then share one group
        try:
            big_sock.send(WRITE.frame(None, 1, [put]))
            resend_sock.send(WRITE.frame(cid, 7, [incr]))
            time.sleep(0.3)  # both frames are queued at the paused owner
        finally:
            os.kill(cluster.pid(0), signal.SIGCONT)
        refused = protocol.unpack_frame(big_sock.recv())
        resent = protocol.unpack_frame(resend_sock.recv())
    finally:
        for sock in socks:
            sock.close()
    assert refused[1] in (DiskFull.code, StoreFull.code)
    assert resent == first  # the kept reply: applied once, before the store filled
    with cluster.client() as c:
        assert c.get("counters", counter) == 5 and c.get("blobs", big) is None


def test_a_retried_batch_applied_before_the_disk_filled_gets_its_kept_reply(
    full_disk: FullDisk,
) -> None:
    disk = full_disk
    resend_beside_a_refused_write(disk.cluster, lambda: disk.ballast.fill(disk.data))


def test_a_retried_batch_applied_before_the_map_cap_gets_its_kept_reply(
    short_dir: Path,
) -> None:
    with Cluster(short_dir, shards=SHARDS, map_size="1MiB", max_map_size="1MiB") as cluster:

        def fill_the_map() -> None:
            with cluster.client() as c:
                for k in keys_on(cluster, "blobs", 0, 100, start=50_000):
                    try:
                        c.put("blobs", k, blob(k, 32 * KiB))
                    except StoreFull:
                        return
            raise AssertionError("the map never reached its cap")

        resend_beside_a_refused_write(cluster, fill_the_map)


def test_a_disk_that_fills_while_the_map_grows_is_refused_the_same_way(
    short_dir: Path,
) -> None:
    with ExitStack() as stack:
        data = small_filesystem(stack, short_dir / "data", FS_SIZE)
        # a map that starts small and may grow past the filesystem's size
        cluster = Cluster(short_dir, shards=SHARDS, map_size="256KiB", max_map_size="64MiB")
        stack.callback(cluster.stop)
        cluster.start()
        disk = FullDisk(cluster, data, stack.enter_context(Ballast()))
        pid = cluster.pid(0)
        keys = disk.keys("blobs", 0, 40)
        with cluster.client() as c:
            for k in keys[:20]:  # the map grows a few times, with room on the disk
                c.put("blobs", k, blob(k, 32 * KiB))
                disk.rows[k] = blob(k, 32 * KiB)
            before = c.ping(0)
            assert before["map_size"] > 256 * KiB

            disk.ballast.fill(data, leave_bytes=256 * KiB)
            # Past the map's end and past the free space: the owner grows the map, then the
            # commit of the grown transaction finds the disk full.
            need = before["map_size"] - before["map_used"] + MiB
            batch = {k: blob(k, need // 4) for k in keys[20:24]}
            with pytest.raises(DiskFull, match="shard 0 takes no writes"):
                with c.batch() as b:
                    for k, v in batch.items():
                        b.put("blobs", k, v)
            disk.refused.update(batch)
            during = c.ping(0)
            assert during["map_size"] > before["map_size"]  # it did grow
            assert during["txn_id"] == before["txn_id"]  # and committed nothing
            assert during["disk_full"] is not None
            disk.check_reads()  # the local map follows the grown size

            disk.ballast.release()
            with c.batch() as b:
                for k, v in batch.items():
                    b.put("blobs", k, v)
            disk.rows.update(batch)
            disk.refused.clear()
            assert c.ping(0)["disk_full"] is None
        disk.check_reads()
        assert cluster.pid(0) == pid and cluster.procs[0].poll() is None


def test_an_embedded_store_raises_disk_full_and_writes_again_once_freed(
    short_dir: Path, schema: lmshard.Schema,
) -> None:
    blobs = schema.tables["blobs"]
    with ExitStack() as stack:
        data = small_filesystem(stack, short_dir / "data", 4 * MiB)
        store = stack.enter_context(lmshard.open(data / "store", schema, map_size=256 * KiB,
                                                 max_map_size=64 * MiB))
        ballast = stack.enter_context(Ballast())
        store.put(blobs, 1, blob(1, 64 * KiB))
        ballast.fill(data, leave_bytes=128 * KiB)
        with pytest.raises(DiskFull, match="this store takes no writes"):
            with store.write() as w:
                for k in range(2, 10):  # the map grows on the way
                    w.put(blobs, k, blob(k, 128 * KiB))
        assert store.count(blobs) == 1 and store.get(blobs, 1) == blob(1, 64 * KiB)
        ballast.release()
        store.put(blobs, 2, blob(2, 128 * KiB))
        assert store.count(blobs) == 2


READERS_AT_ONCE = 300
"""Enough read transactions at once to reach reader slots past the lock file's first pages."""

_HOLD_SLOTS = """
import sys, threading, lmshard
from tests.schemas import schema
store = lmshard.open(sys.argv[1], schema, readonly=True, max_readers=400)
together = threading.Barrier(int(sys.argv[2]))
def hold():
    with store.read():
        together.wait(60)
threads = [threading.Thread(target=hold) for _ in range(int(sys.argv[2]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("held", len(threads))
"""


def test_reader_slots_work_on_a_full_disk(short_dir: Path) -> None:
    """LMDB's lock file is sparse: a reader slot on a page never written would need a block
    the full disk cannot give, and the process would die of SIGBUS. The writer allocates the
    whole lock file when it opens the store."""
    import subprocess
    import sys

    from tests.cluster import env_for_children
    from tests.schemas import schema

    with ExitStack() as stack:
        data = small_filesystem(stack, short_dir / "data", 1 * MiB)
        store = stack.enter_context(lmshard.open(data / "store", schema, map_size=256 * KiB,
                                                 max_readers=400))
        store.put(schema.tables["blobs"], 1, b"x")
        ballast = stack.enter_context(Ballast())
        ballast.fill(data)
        done = subprocess.run(
            [sys.executable, "-c", _HOLD_SLOTS, str(data / "store"), str(READERS_AT_ONCE)],
            capture_output=True, text=True, timeout=120, env=env_for_children())
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.split() == ["held", str(READERS_AT_ONCE)]
