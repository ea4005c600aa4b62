"""The async client's one-shard requests over the owners' unix stream sockets, against real
owners: taken when the config allows, many in flight applied once, large frames over ZeroMQ,
an owner SIGKILLed or a stream broken with requests in flight, cancellation, fork."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmshard.aio
from lmshard.unix_wire import CLIENT_MAX_FRAME, unix_path
from tests.cluster import Cluster, wait_for
from tests.test_aio import run
from tests.test_unix_client import open_unix_connections


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four owners (fsync on) shared by this module's tests that leave them running."""
    cl = Cluster(tmp_path_factory.mktemp("aio-unix"))
    with cl:
        paths = [unix_path(cl.config.endpoint(s)) for s in range(4)]
        assert all(p is not None and os.path.exists(p) for p in paths), paths
        yield cl


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def owner_peers(cl: Cluster, shard: int) -> int:
    """The connections the owner of ``shard`` has accepted on its unix socket."""
    path = unix_path(cl.config.endpoint(shard))
    assert path is not None
    return open_unix_connections(path)


def unix_sent(c: lmshard.aio.AsyncClient) -> int:
    return sum(sh.unix_sent for sh in c.owners._shards.values())


def shard_of(c: lmshard.aio.AsyncClient, table: str, key: Any) -> int:
    t = c.tables[table]
    return int(t.shard(key, t.kenc(key)))


def test_single_requests_go_over_the_unix_socket(service: Cluster, loop: str) -> None:
    # The module's earlier clients closed theirs; an owner drops one once it reads its end.
    wait_for("the earlier unix connections to go",
             lambda: not any(owner_peers(service, s) for s in range(4)))
    before = [owner_peers(service, s) for s in range(4)]

    async def main() -> None:
        async with lmshard.aio.connect(service.config, local_reads=False) as c:
            for i in range(40):
                await c.put("blobs", i, b"v%d" % i)
            assert [await c.get("blobs", i) for i in range(40)] == [b"v%d" % i for i in range(40)]
            assert unix_sent(c) == 80  # every put and every (remote) get
            for s, sh in c.owners._shards.items():
                assert sh.unix is not None and not sh.unix.closed, s
                assert owner_peers(service, s) == before[s] + 1
                sh.sock.close(linger=0)  # nothing more may go through ZeroMQ
            assert await c.incr("counters", f"over-unix-{loop}", 3) == 3
            assert await c.incr("counters", f"over-unix-{loop}") == 4
            assert c.counters()["timeouts"] == 0

    run(main, loop)
    time.sleep(0.2)  # the owners see the connections closed
    assert [owner_peers(service, s) for s in range(4)] == before


def test_many_puts_in_flight_over_one_connection_are_applied_once(service: Cluster,
                                                                  loop: str) -> None:
    keys = [f"many-{loop}-{k}" for k in range(50)]
    base = {"asyncio": 100_000, "uvloop": 200_000}[loop]

    async def worker(c: lmshard.aio.AsyncClient, i: int) -> None:
        for j in range(10):
            await c.incr("counters", keys[(i + j) % len(keys)])
            await c.put("records", base + i * 10 + j, {"w": i, "j": j})
            assert await c.incr("counters", f"many-own-{loop}-{i}") == j + 1  # its own reply

    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            await asyncio.gather(*(worker(c, i) for i in range(200)))
            assert unix_sent(c) == 6000  # nothing resent, nothing over ZeroMQ
            assert await c.get_many("counters", keys) == [40] * len(keys)
            rows = await c.get_many("records", range(base, base + 2000))
            assert [r["w"] * 10 + r["j"] for r in rows] == list(range(2000))
            assert all(len(sh.inflight) == 0 for sh in c.owners._shards.values())
            assert c.counters()["retries"] == 0

    run(main, loop)


def test_a_frame_over_the_limit_goes_over_zeromq(service: Cluster) -> None:
    big = os.urandom(CLIENT_MAX_FRAME + 1000)

    async def main() -> None:
        async with lmshard.aio.connect(service.config, local_reads=False) as c:
            await c.put("blobs", 900_001, b"small")
            shard = shard_of(c, "blobs", 900_002)
            sent = unix_sent(c)
            await c.put("blobs", 900_002, big)
            assert unix_sent(c) == sent  # the DEALER carried it
            assert await c.get("blobs", 900_002) == big  # (a small request, a large reply)
            assert unix_sent(c) == sent + 1
            sh = c.owners._shards[shard]
            assert sh.unix is not None and not sh.unix.closed

    asyncio.run(main())


def test_config_off_opens_no_unix_connection(service: Cluster) -> None:
    off = dataclasses.replace(service.config, unix_socket=False)
    before = [owner_peers(service, s) for s in range(4)]

    async def main() -> None:
        async with lmshard.aio.connect(off) as c:
            await asyncio.gather(*(c.incr("counters", f"off-{i}") for i in range(100)))
            assert await c.get_many("counters", [f"off-{i}" for i in range(100)]) == [1] * 100
            assert unix_sent(c) == 0
            assert all(sh.unix is None and sh.unix_path is None
                       for sh in c.owners._shards.values())
            assert [owner_peers(service, s) for s in range(4)] == before

    asyncio.run(main())


def test_a_broken_stream_resends_its_requests_over_zeromq_at_once(service: Cluster,
                                                                  loop: str) -> None:
    """Requests in flight on a stream that breaks go over the DEALER at once, not after a
    timeout; those the owner had read already are answered from its record, not applied
    again. (The owner is stopped while the client's end is shut down, so that each request
    is in both places.)"""
    keys = [f"broken-{loop}-{k}" for k in range(30)]

    async def main() -> None:
        async with lmshard.aio.connect(service.config, timeout_ms=20_000, retries=0) as c:
            shard = shard_of(c, "counters", keys[0])
            mine = [k for k in keys if shard_of(c, "counters", k) == shard]
            await c.incr("counters", mine[0], 0)  # the connection is open
            sh = c.owners._shards[shard]
            stream = sh.unix
            assert stream is not None
            os.kill(service.pid(shard), signal.SIGSTOP)
            try:
                tasks = [asyncio.create_task(c.incr("counters", k)) for k in mine]
                await asyncio.sleep(0.05)
                assert all(r.via is stream for r in sh.inflight.values())
                assert len(sh.inflight) == len(mine)
                assert stream._sock is not None
                stream._sock.shutdown(socket.SHUT_RDWR)
                await asyncio.sleep(0.05)
                assert stream.closed and sh.unix is None
                assert all(r.via is None for r in sh.inflight.values())  # on the DEALER now
            finally:
                os.kill(service.pid(shard), signal.SIGCONT)
            started = time.monotonic()
            assert await asyncio.gather(*tasks) == [1] * len(mine)
            assert time.monotonic() - started < 10  # not after timeout_ms
            assert await c.get_many("counters", mine) == [1] * len(mine)
            assert c.counters()["timeouts"] == 0
            assert c.counters()["unix_fallbacks"] == len(mine)  # each sent again at once
            assert c.counters()["retries"] == 0
            # A second later, a new connection is opened by the next request.
            await asyncio.sleep(1.1)
            await c.incr("counters", mine[0])
            assert sh.unix is not None and sh.unix is not stream

    run(main, loop)


def test_every_put_in_flight_on_the_stream_of_a_sigkilled_owner_completes_once(
        tmp_path: Path) -> None:
    victim = 1
    with Cluster(tmp_path) as cl:
        incrs: dict[int, int] = {}
        stop = asyncio.Event()

        async def worker(c: lmshard.aio.AsyncClient, key: str, i: int) -> None:
            incrs[i] = 0
            while not stop.is_set():
                n = await c.incr("counters", key)
                incrs[i] += 1
                assert n == incrs[i], (key, n, incrs[i])  # its own reply, applied once

        async def main() -> dict[str, int]:
            async with lmshard.aio.connect(cl.config, timeout_ms=500, retries=40) as c:
                keys = [k for k in (f"kill-{n}" for n in range(2000))
                        if shard_of(c, "counters", k) == victim][:200]
                tasks = [asyncio.create_task(worker(c, k, i)) for i, k in enumerate(keys)]
                await asyncio.sleep(1.0)
                sh = c.owners._shards[victim]
                stream = sh.unix
                assert stream is not None and len(sh.inflight) > 0
                assert any(r.via is stream for r in sh.inflight.values())
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, cl.kill, victim)  # SIGKILL mid-write
                for _ in range(100):
                    if stream.closed:
                        break
                    await asyncio.sleep(0.01)
                assert stream.closed  # seen broken while the owner was gone
                await asyncio.sleep(0.3)
                await loop.run_in_executor(None, cl.start, victim)
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.gather(*tasks)
                counts = await c.get_many("counters", keys)
                assert counts == [incrs[i] for i in range(len(keys))]  # each acked incr once
                assert sh.unix is not None and not sh.unix.closed  # a new connection
                return dict(c.counters())

        t = time.monotonic()
        counters = asyncio.run(main())
        # The kill did land mid-write: requests were sent again, at once over ZeroMQ from the
        # broken unix connection, or after a timeout.
        assert counters["unix_fallbacks"] + counters["retries"] > 0
        assert time.monotonic() - t < 120


def test_the_unix_connection_follows_the_shard_to_the_promoted_copy(tmp_path: Path) -> None:
    from tests.test_replica_client import PROMOTED, _copy_home_to, _rows, _serve_copy, _stop

    cl = Cluster(tmp_path, shards=1, replica_names=["b"],
                 replica_data_dir=str(tmp_path / "replicas"))
    home_path = unix_path(cl.config.endpoint(0))
    b_path = unix_path(cl.config.member(0, "b").endpoint)
    assert home_path is not None and b_path is not None

    async def main() -> None:
        async with lmshard.aio.connect(cl.config, timeout_ms=300, retries=1,
                                       local_reads=False) as db:
            await db.put("records", 1, {"name": "before"})
            sh = db.owners._shards[0]
            home = sh.unix
            assert home is not None and home.path == home_path
            cl.kill(0, signal.SIGTERM)
            _copy_home_to(cl, "b", PROMOTED)
            b = _serve_copy(cl, "b")
            try:
                await asyncio.gather(*(db.put("records", k, {"name": f"r{k}"})
                                       for k in range(2, 12)),
                                     *(db.incr("counters", "hits") for _ in range(10)))
                assert home.closed
                assert sh.unix is not None and sh.unix.path == b_path
                sent = sh.unix_sent
                assert await db.get("records", 11) == {"name": "r11"}
                assert sh.unix_sent == sent + 1 and open_unix_connections(b_path) == 1
            finally:
                _stop(b)

    try:
        cl.start()
        asyncio.run(main())
        b_dir = cl.config.member(0, "b").dir
        assert sorted(_rows(b_dir, "records")) == list(range(1, 12))
        assert _rows(b_dir, "counters") == {"hits": 10}
    finally:
        cl.stop()


def test_a_cancelled_request_on_the_stream_is_applied_at_most_once(service: Cluster) -> None:
    keys = [f"cancel-unix-{k}" for k in range(60)]

    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            shard = shard_of(c, "counters", keys[0])
            mine = [k for k in keys if shard_of(c, "counters", k) == shard]
            await c.incr("counters", mine[0], 0)
            sh = c.owners._shards[shard]
            stream = sh.unix
            os.kill(service.pid(shard), signal.SIGSTOP)  # every request is sent, none answered
            try:
                tasks = [asyncio.create_task(c.incr("counters", k)) for k in mine]
                await asyncio.sleep(0.05)
                assert len(sh.inflight) == len(mine)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                assert not sh.inflight and len(sh.free) == sh.lanes  # lanes back at once
            finally:
                os.kill(service.pid(shard), signal.SIGCONT)
            await asyncio.sleep(0.3)  # the owner applies what it read; replies are dropped
            values = await c.get_many("counters", mine, 0)
            assert set(values) <= {0, 1}
            assert [await c.incr("counters", k) for k in mine] == [v + 1 for v in values]
            await asyncio.sleep(0.1)
            assert await c.get_many("counters", mine, 0) == [v + 1 for v in values]
            assert sh.unix is stream and c.counters()["retries"] == 0

    asyncio.run(main())


def _child(out: Any) -> None:
    c = _shared["client"]

    async def main() -> None:
        parents = _shared["stream"]
        out.put((await c.incr("counters", "unix-forked"), unix_sent(c), parents.closed))
        await c.close()

    asyncio.run(main())


_shared: dict[str, Any] = {}


def test_a_forked_child_leaves_the_parents_connection_open(service: Cluster) -> None:
    """Forked while the parent's loop runs: the child opens its own connection and closes its
    copy of the parent's; the parent goes on over its own on the same loop."""
    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            _shared["client"] = c
            await c.incr("counters", "unix-forked")
            shard = shard_of(c, "counters", "unix-forked")
            stream = c.owners._shards[shard].unix
            assert stream is not None
            _shared["stream"] = stream
            peers = owner_peers(service, shard)
            ctx = mp.get_context("fork")
            out = ctx.Queue()
            p = ctx.Process(target=_child, args=(out,))
            p.start()
            await asyncio.get_running_loop().run_in_executor(None, p.join, 60)
            assert p.exitcode == 0
            # over a connection of its own; its copy of the parent's closed
            assert out.get(timeout=5) == (2, 1, True)
            assert await c.incr("counters", "unix-forked") == 3
            assert c.owners._shards[shard].unix is stream and not stream.closed
            assert owner_peers(service, shard) == peers

    asyncio.run(main())
