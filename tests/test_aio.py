"""The asyncio client against real shard owners: the API, many coroutines on one client,
cancellation at any point, an owner SIGKILLed under load, bad input, uvloop, fork."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

import lmshard
import lmshard.aio
from lmshard.errors import (
    BatchesFailed,
    BatchPartiallyApplied,
    CodecError,
    Error,
    TransactionError,
    UnknownIndex,
    UnknownTable,
)
from tests.cluster import Cluster

LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}


def run(main: Callable[[], Awaitable[Any]], loop: str = "asyncio") -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four owners (fsync on) shared by this module's tests that leave them running."""
    cl = Cluster(tmp_path_factory.mktemp("aio"))
    with cl:
        yield cl


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_data_api_with_await(service: Cluster, loop: str) -> None:
    tag = f"api-{loop}"

    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            await c.put("counters", f"{tag}-a", {"n": 1})
            assert await c.get("counters", f"{tag}-a") == {"n": 1}
            assert await c.exists("counters", f"{tag}-a")
            assert await c.get("counters", f"{tag}-none", "dflt") == "dflt"
            assert await c.incr("counters", f"{tag}-n", 5) == 5
            assert await c.incr("counters", f"{tag}-n") == 6
            assert await c.delete("counters", f"{tag}-a") is True
            assert await c.delete("counters", f"{tag}-a") is False
            assert await c.cas("counters", f"{tag}-c", 1) is True
            assert await c.cas("counters", f"{tag}-c", 2, expected=9) is False
            assert await c.cas("counters", f"{tag}-c", 2, expected=1) is True
            async with c.batch() as b:
                for i in range(5):
                    b.put("events", (tag, i), {"i": i})
                b.incr("counters", f"{tag}-n")
            assert b.results == [None] * 5 + [7]
            assert await c.get_many("events", [(tag, 4), (tag, 9), (tag, 0)]) == [
                {"i": 4}, None, {"i": 0}]
            assert await c.count("events", prefix=(tag,)) == 5
            rows = [r async for r in c.scan("events", prefix=(tag,), reverse=True, limit=3)]
            assert rows == [((tag, i), {"i": i}) for i in (4, 3, 2)]
            await c.put("items", 1, {"group": tag})
            assert await c.lookup("items", "by_group", tag) == [(1, {"group": tag})]
            async with c.writer(batch_size=7, window=2) as w:
                for i in range(100):
                    await w.put("blobs", i, b"%d" % i)
            assert w.ops_committed == 100 and await c.get("blobs", 99) == b"99"
            stats = await c.stats()
            assert set(stats["shards"]) == {0, 1, 2, 3}
            assert stats["client"]["ops_sent"] >= 100
            assert (await c.ping(0))["shard"] == 0

    run(main, loop)


def test_reads_over_the_wire_when_the_shards_are_not_mapped_here(service: Cluster) -> None:
    async def main() -> None:
        async with lmshard.aio.connect(service.config, local_reads=False) as c:
            async with c.writer() as w:
                for i in range(2500):
                    await w.put("events", ("wire", i), i)
            assert await c.get("events", ("wire", 7)) == 7
            assert await c.count("events", prefix=("wire",)) == 2500
            rows = [k async for k, _ in c.scan("events", prefix=("wire",))]
            assert rows == [("wire", i) for i in range(2500)]  # pages of 1000, merged
            assert c.counters()["remote_reads"] > 3
            assert all(c.local_store(s) is None for s in range(4))

    run(main)


def test_a_thousand_coroutines_put_and_read_back_their_own_rows(service: Cluster,
                                                                 loop: str) -> None:
    base = {"asyncio": 10_000, "uvloop": 20_000}[loop]

    async def worker(c: lmshard.aio.AsyncClient, i: int) -> None:
        for j in range(3):
            key = base + i * 3 + j
            await c.put("records", key, {"w": i, "j": j})
            assert await c.get("records", key) == {"w": i, "j": j}  # read your write

    async def main() -> dict[str, Any]:
        async with lmshard.aio.connect(service.config) as c:
            before = await c.stats()
            await asyncio.gather(*(worker(c, i) for i in range(1000)))
            after = await c.stats()
            keys = range(base, base + 3000)
            assert [v["w"] * 3 + v["j"] for v in await c.get_many("records", keys)] == \
                [k - base for k in keys]
            assert await c.count("records", start=base, end=base + 3000) == 3000
            return {s: (after["shards"][s]["owner"]["commits"]
                        - before["shards"][s]["owner"]["commits"]) for s in range(4)}

    commits = run(main, loop)
    # Sent without waiting for each other: the owners committed them in groups.
    assert sum(commits.values()) < 3000 / 4


def test_cancelled_writes_are_applied_once_or_not_at_all(service: Cluster) -> None:
    # A timeout this short resends many requests while their first copy is still queued at
    # the owner: cancellations land before the send, after it, and between resends.
    async def main() -> None:
        rng = random.Random(16)
        async with lmshard.aio.connect(service.config, timeout_ms=3, retries=1000) as c:
            keys = [f"cancel-{n}" for n in range(400)]

            async def one(key: str) -> None:
                how = rng.random()
                task = asyncio.ensure_future(c.incr("counters", key))
                if how < 0.15:
                    task.cancel()  # before it runs: nothing is sent
                elif how < 0.85:
                    await asyncio.sleep(rng.random() * 0.01)
                    task.cancel()
                else:
                    try:
                        async with asyncio.timeout(rng.random() * 0.01):
                            await task
                    except TimeoutError:
                        pass
                try:
                    await task
                except asyncio.CancelledError:
                    pass

            for group in range(0, len(keys), 50):
                await asyncio.gather(*(one(k) for k in keys[group:group + 50]))
            await asyncio.sleep(0.3)  # requests still in the sockets reach the owners
            values = await c.get_many("counters", keys, 0)
            assert set(values) <= {0, 1}, [v for v in values if v not in (0, 1)]
            assert 0 < values.count(1) < len(keys)
            # the client is still usable, and nothing is resent later
            assert [await c.incr("counters", k) for k in keys[:20]] == [
                v + 1 for v in values[:20]]
            await asyncio.sleep(0.1)
            assert await c.get_many("counters", keys[:20], 0) == [v + 1 for v in values[:20]]
            for sh in c.owners._shards.values():  # every lane came back
                assert len(sh.free) == sh.lanes and not sh.inflight

    run(main)


def test_bad_input_raises_the_sync_clients_errors_at_the_call(service: Cluster) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("put", ("nope", 1, 1), {}),
        ("put", ("records", "not-an-int", 1), {}),
        ("put", ("records", -1, 1), {}),
        ("put", ("blobs", 1, "text, not bytes"), {}),
        ("put", ("counters", "k" * 600, 1), {}),
        ("incr", ("counters", "k", 1.5), {}),
        ("get", ("records", "x"), {}),
        ("get_many", ("nope", [1]), {}),
        ("lookup", ("items", "no_such_index", 1), {}),
        ("count", ("nope",), {}),
        ("scan", ("nope",), {}),
        ("cas", ("blobs", 1, "text"), {}),
        ("put", ("users", lmshard.Schema, {}), {}),
    ]
    with service.client() as sync:
        expected = []
        for name, args, kwargs in calls:
            with pytest.raises(Error) as info:
                r = getattr(sync, name)(*args, **kwargs)
                if name == "scan":
                    list(r)
            expected.append((type(info.value), info.value.message))

    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            for (name, args, kwargs), (etype, message) in zip(calls, expected, strict=True):
                with pytest.raises(Error) as info:
                    r = getattr(c, name)(*args, **kwargs)
                    if name != "scan":  # a scan raises at the call, before any await
                        await r
                assert (type(info.value), info.value.message) == (etype, message), name
            with pytest.raises(TransactionError):
                c.writer(batch_size=0)
            async with c.batch() as b:
                with pytest.raises(CodecError):
                    b.put("blobs", 1, "text")  # raised at the op, nothing sent
            assert len(b) == 0

    run(main)
    assert {e for e, _ in expected} >= {UnknownTable, UnknownIndex, CodecError}


def test_refused_writes_are_typed_as_with_the_sync_client(service: Cluster) -> None:
    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            await c.put("users", lmshard_uuid(1), {"email": "dup@x"})
            with pytest.raises(Error) as info:
                await c.put("users", lmshard_uuid(2), {"email": "dup@x"})
            assert type(info.value).__name__ == "UniqueViolation"
            with pytest.raises(BatchPartiallyApplied):
                async with c.batch() as b:  # users is pinned to one shard, events spread
                    b.put("users", lmshard_uuid(3), {"email": "dup@x"})
                    for i in range(8):
                        b.put("events", (f"partial-{i}", 0), i)
            with pytest.raises(BatchesFailed):
                async with c.writer() as w:
                    await w.put("users", lmshard_uuid(4), {"email": "dup@x"})
            assert await c.get("users", lmshard_uuid(1)) == {"email": "dup@x"}

    run(main)


def lmshard_uuid(n: int) -> Any:
    import uuid

    return uuid.UUID(int=n)


def test_watch_is_an_async_iterator_that_resumes_from_its_cursor(service: Cluster) -> None:
    async def main() -> None:
        async with lmshard.aio.connect(service.config) as c:
            async with await c.watch("counters", prefix="watched-") as w:
                for i in range(3):
                    await c.put("counters", f"watched-{i}", i)
                await c.put("counters", "unwatched", 1)
                seen = []
                async for change in w:
                    seen.append((change.key, change.value))
                    if len(seen) == 3:
                        break
                cursor = change.cursor
            assert sorted(seen) == [(f"watched-{i}", i) for i in range(3)]
            await c.put("counters", "watched-9", 9)
            async with await c.watch("counters", prefix="watched-", since=cursor) as again:
                change = await again.get(timeout=10)
                assert change is not None and (change.key, change.value) == ("watched-9", 9)
                assert await again.get(timeout=0.05) is None

    run(main)


def _child(config_path: str, out: Any) -> None:
    c = _shared["client"]

    async def main() -> None:
        await c.put("counters", "forked", 41)
        out.put((await c.incr("counters", "forked"), await c.get("counters", "forked")))
        await c.close()

    asyncio.run(main())


_shared: dict[str, Any] = {}


def test_a_forked_child_opens_its_own_sockets(service: Cluster) -> None:
    c = lmshard.aio.connect(service.config)
    _shared["client"] = c

    async def use() -> None:
        await c.put("counters", "parent", 1)
        assert await c.get("counters", "parent") == 1

    asyncio.run(use())  # the parent's sockets and maps are open
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(service.config_path), out))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert out.get(timeout=5) == (42, 42)
    asyncio.run(use())  # the parent goes on, on a new loop
    asyncio.run(c.close())


def test_every_acked_write_once_with_an_owner_sigkilled_mid_run(tmp_path: Path) -> None:
    victim = 1
    with Cluster(tmp_path) as cl:
        acked: dict[int, list[int]] = {}
        incrs: dict[int, int] = {}
        stop = asyncio.Event()

        async def worker(c: lmshard.aio.AsyncClient, i: int) -> None:
            acked[i], incrs[i] = [], 0
            j = 0
            while not stop.is_set():
                key = i * 10_000 + j
                await c.put("records", key, {"w": i, "j": j})
                acked[i].append(key)
                await c.incr("counters", f"sigkill-{i}")
                incrs[i] += 1
                j += 1

        async def main() -> dict[str, int]:
            async with lmshard.aio.connect(cl.config, timeout_ms=500, retries=40) as c:
                tasks = [asyncio.create_task(worker(c, i)) for i in range(1000)]
                await asyncio.sleep(1.5)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, cl.kill, victim)  # SIGKILL mid-write
                await asyncio.sleep(0.3)
                await loop.run_in_executor(None, cl.start, victim)
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.gather(*tasks)
                keys = [k for ks in acked.values() for k in ks]
                rows = await c.get_many("records", keys)
                assert all(v is not None and v["w"] * 10_000 + v["j"] == k
                           for k, v in zip(keys, rows, strict=True))
                counts = await c.get_many("counters", [f"sigkill-{i}" for i in range(1000)])
                assert counts == [incrs[i] for i in range(1000)]  # each acked incr once
                return c.counters()

        t = time.monotonic()
        counters = run(main)
        # The kill did land mid-write: requests were sent again, at once over ZeroMQ from the
        # broken unix connection, or after a timeout.
        assert counters["unix_fallbacks"] + counters["retries"] > 0
        assert time.monotonic() - t < 120


def test_a_silent_shard_fails_fast_while_the_others_serve(tmp_path: Path) -> None:
    """The sync client's circuit breaker, in the async client: once a shard left a request
    unanswered through every retry, calls to it fail at once; the others serve; after
    breaker_ms one call probes and gets through."""
    import os
    import signal

    cl = Cluster(tmp_path, shards=2)
    with cl:
        c = lmshard.aio.connect(cl.config, timeout_ms=300, retries=1, breaker_ms=1500)
        ct = c.tables["counters"]

        def key_on(shard: int) -> str:
            return next(k for k in (f"k{i}" for i in range(1000))
                        if ct.shard(k, ct.kenc(k)) == shard)

        silent, other = key_on(1), key_on(0)

        async def main() -> None:
            await c.put("counters", other, 0)
            os.kill(cl.pid(1), signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(lmshard.ShardUnavailable, match="did not answer within"):
                    await c.put("counters", silent, 1)
                assert time.monotonic() - started >= 0.55  # 300 ms x 2 attempts
                started = time.monotonic()
                for _ in range(20):
                    with pytest.raises(lmshard.ShardUnavailable, match="fail at once"):
                        await c.incr("counters", silent)
                assert time.monotonic() - started < 0.25
                assert await c.incr("counters", other) == 1  # the other shard serves
            finally:
                os.kill(cl.pid(1), signal.SIGCONT)
            await asyncio.sleep(1.6)  # the breaker runs out: the probe gets through
            await c.put("counters", silent, 3)
            assert await c.get("counters", silent) == 3
            await c.close()

        run(main)


def test_the_child_of_a_libc_fork_uses_its_own_sockets_and_maps(service: Cluster) -> None:
    """A fork that ran no Python hooks (uWSGI without --lazy-apps): the async client notices
    it by its pid, as the sync client does (tests/test_web_clients.py)."""
    from tests.test_web_clients import libc_fork_run

    c = lmshard.aio.connect(service.config, timeout_ms=1000, retries=1)
    ct = c.tables["counters"]
    shard = ct.shard("libc-parent", ct.kenc("libc-parent"))

    async def parent() -> Any:
        await c.put("counters", "libc-parent", 1)
        assert await c.get("counters", "libc-parent") == 1
        return c.local_store(shard).env  # type: ignore[union-attr]

    parent_env = asyncio.run(parent())

    def child() -> dict[str, Any]:
        async def use() -> dict[str, Any]:
            n = await c.incr("counters", "libc-parent", 10)
            st = c.local_store(shard)
            return {"n": n, "own_env": st is not None and st.env is not parent_env}
        return asyncio.run(use())

    assert libc_fork_run(child) == {"n": 11, "own_env": True}

    async def after() -> None:
        assert await c.get("counters", "libc-parent") == 11
        await c.close()

    asyncio.run(after())
