"""Clients across a re-shard (``lmshard.slot_routes``): real owners, slots moved by hand.

The test drives one move the way ``lmshard reshard`` does, command by command (``slot_state``,
``move_rows``): slots S of shard 0 become incoming on shard 1, frozen on shard 0, are copied, and
switch to shard 1 under map version 1 (shard 1 first, then shard 0 with S outgoing), then shard
0's copies are dropped. Clients that still route by version 0 write and read meanwhile: their
writes land once where the slot lives, their reads never see a row of a slot the shard read does
not serve.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmshard
import lmshard.aio
from lmshard import Client
from lmshard.errors import Error
from lmshard.protocol import MOVE_ROWS, OP_DELETE, OP_PUT, SLOT_STATE
from lmshard.routing import SlotMap
from lmshard.slot_state import RowSlots, SlotState
from tests.cluster import Cluster

MOVED = frozenset(range(0, 128))
"""The slots moved: the first quarter of shard 0's (slots 0..511 of 1024 with 2 shards)."""


class HandMove:
    """One move of MOVED from shard 0 to shard 1, step by step, through an admin client that
    reads nothing in-process: a process maps a shard's files once, and the client under test
    (``files``) must map them itself (its reads are what the tests check). The rows to copy and
    check are read from the files as that client mapped them, without any filter."""

    def __init__(self, service: Cluster, slots: frozenset[int] = MOVED, src: int = 0,
                 dst: int = 1) -> None:
        self.service = service
        self.slots, self.src, self.dst = slots, src, dst
        self.admin = service.client(local_reads=False)
        self.files: Any = None
        """The client under test, whose mapped files are read here."""
        self.old = service.config.slot_map
        table = list(self.old.assignment)
        for s in slots:
            table[s] = dst
        self.new = SlotMap(self.old.shards, self.old.slots, table, empty_ok=True)

    def record(self, shard: int, state: SlotState) -> None:
        r = self.admin.owners.request(shard, SLOT_STATE.code, state.to_wire(), write=False)
        assert not isinstance(r, Error), r

    def move_rows(self, shard: int, ops: list[list[Any]]) -> None:
        if ops:
            r = self.admin.owners.request(shard, MOVE_ROWS.code, ops, write=True)
            assert not isinstance(r, Error), r

    def moved_rows(self, shard: int) -> list[list[Any]]:
        """[table id, key bytes, stored bytes] of every row of the slots moved on ``shard``,
        read from its files as they are (no slot filter)."""
        st = self.files.local_store(shard)
        assert st is not None
        slots = RowSlots(self.old)
        out = []
        with st.read() as r:
            for ct in self.admin.tables.each():
                out.extend([ct.tid, k, v] for k, v in r.scan_raw(ct.table)
                           if slots.slot(ct, k) in self.slots)
        return out

    def incoming(self) -> None:
        self.record(self.dst, SlotState(0, self.old, incoming=self.slots))

    def freeze(self) -> None:
        self.record(self.src, SlotState(0, self.old, frozen=self.slots))

    def copy(self) -> None:
        self.move_rows(self.dst, [[OP_PUT, tid, k, v] for tid, k, v in self.moved_rows(self.src)])

    def switch(self) -> None:
        self.record(self.dst, SlotState(1, self.new))
        self.record(self.src, SlotState(1, self.new, outgoing=self.slots))

    def drop(self) -> None:
        self.move_rows(self.src, [[OP_DELETE, tid, k, None]
                                  for tid, k, _ in self.moved_rows(self.src)])
        self.record(self.src, SlotState(1, self.new))

    def all_of_it(self) -> None:
        self.incoming()
        self.freeze()
        self.copy()
        self.switch()
        self.drop()

    def raw(self, shard: int, table: str, key: Any) -> bytes | None:
        """The stored bytes of a row on ``shard``'s files, unfiltered."""
        ct = self.admin.table(table)
        st = self.files.local_store(shard)
        assert st is not None
        with st.read() as r:
            return r.get_raw(ct.table, ct.kenc(key))

    def close(self) -> None:
        self.admin.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, shards=2, sync=False) as svc:
        yield svc


@pytest.fixture
def move(service: Cluster) -> Iterator[HandMove]:
    m = HandMove(service)
    yield m
    m.close()


def keys_where(c: Client, table: str, want: Any, n: int) -> list[str]:
    """``n`` counter keys whose slot (under the config's map) satisfies ``want(slot)``."""
    ct = c.table(table)
    out = []
    i = 0
    while len(out) < n:
        key = f"k{i}"
        if want(ct.route.slot(key, ct.kenc(key))):
            out.append(key)
        i += 1
    return out


def moved_keys(c: Client, n: int) -> list[str]:
    return keys_where(c, "counters", lambda s: s in MOVED, n)


def kept_keys(c: Client, shard: int, n: int) -> list[str]:
    return keys_where(c, "counters", lambda s: s not in MOVED and s * 2 // 1024 == shard, n)


def test_a_write_by_the_old_map_lands_once_on_the_new_shard(service: Cluster,
                                                             move: HandMove) -> None:
    with service.client() as c:
        move.files = c
        [k] = moved_keys(c, 1)
        c.incr("counters", k, 5)
        move.incoming()
        move.freeze()
        move.copy()
        move.switch()
        assert c.routes.version == 0
        assert c.incr("counters", k, 1) == 6
        assert c.routes.version == 1 and c.routes.map == move.new
        assert move.raw(1, "counters", k) == c.table("counters").dumps(6)
        assert move.raw(0, "counters", k) == c.table("counters").dumps(5)  # not written there
        assert c.get("counters", k) == 6


def test_a_batch_over_both_shards_is_routed_again(service: Cluster, move: HandMove) -> None:
    with service.client() as c:
        move.files = c
        moved, [on0], [on1] = moved_keys(c, 3), kept_keys(c, 0, 1), kept_keys(c, 1, 1)
        move.all_of_it()
        with c.batch() as b:
            for k in [moved[0], on0, moved[1], on1, moved[2]]:
                b.incr("counters", k, 1)
        assert b.results == [1, 1, 1, 1, 1]
        assert c.routes.version == 1
        assert [c.get("counters", k) for k in [*moved, on0, on1]] == [1] * 5
        for k in moved:
            assert move.raw(0, "counters", k) is None


def test_a_write_to_a_frozen_slot_waits_for_the_switch(service: Cluster, move: HandMove) -> None:
    with service.client() as c:
        move.files = c
        k, k2 = moved_keys(c, 2)
        [on1] = kept_keys(c, 1, 1)
        c.incr("counters", k, 1)
        move.incoming()
        move.freeze()
        result: list[Any] = []

        def in_a_batch() -> None:
            with c.batch() as b:
                b.incr("counters", k2, 1)
                b.incr("counters", on1, 1)
            result.append(b.results)

        threads = [threading.Thread(target=lambda: result.append(c.incr("counters", k, 1))),
                   threading.Thread(target=in_a_batch)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert all(t.is_alive() for t in threads) and not result  # waiting, not applied
        assert c.get("counters", on1) == 1  # the batch's part for shard 1 is applied
        move.copy()
        move.switch()
        for t in threads:
            t.join(10)
        assert sorted(result, key=str) == [2, [1, 1]]
        assert move.raw(1, "counters", k) == c.table("counters").dumps(2)
        assert move.raw(0, "counters", k) == c.table("counters").dumps(1)
        assert move.raw(1, "counters", k2) == c.table("counters").dumps(1)
        assert move.raw(0, "counters", k2) is None


def test_local_reads_serve_each_row_from_the_shard_that_owns_it(service: Cluster,
                                                                 move: HandMove) -> None:
    c = service.client()
    move.files = c
    try:
        moved, kept = moved_keys(c, 4), kept_keys(c, 1, 2)
        for i, k in enumerate(moved + kept):
            c.put("counters", k, i)
        ct = c.table("counters")
        ghost = moved_keys(c, 5)[4]  # a row of a moved slot that only the copy has
        move.incoming()
        move.freeze()
        move.copy()
        move.move_rows(1, [[OP_PUT, ct.tid, ct.kenc(ghost), ct.dumps(99)]])
        # Before the switch: shard 1's copies are not read.
        assert c.get("counters", ghost) is None
        assert c.count("counters") == 6
        assert dict(c.scan("counters")) == {k: i for i, k in enumerate(moved + kept)}
        assert c.get_many("counters", [ghost, moved[0]]) == [None, 0]
        move.switch()
        # After it: shard 0's rows of the moved slots are not read, even by a client that
        # still routes by the old map (it learns the new one from the shard's records).
        with service.client() as other:
            other.put("counters", moved[0], 100)  # only on shard 1: shard 0 keeps the old 0
            other.delete("counters", moved[1])
        assert c.routes.version == 0
        assert c.get("counters", moved[0]) == 100
        assert c.routes.version == 1
        assert c.get("counters", moved[1]) is None
        assert c.get("counters", ghost) == 99
        want = {k: i for i, k in enumerate(moved + kept)} | {moved[0]: 100, ghost: 99}
        del want[moved[1]]
        assert dict(c.scan("counters")) == want
        assert c.count("counters") == len(want)
        assert move.raw(0, "counters", moved[1]) is not None  # still there, never read
        assert c.counters()["remote_reads"] == 0  # every read above was this process's own
    finally:
        c.close()


def test_a_unique_lookup_follows_a_pinned_table_to_its_new_shard(service: Cluster) -> None:
    with service.client() as c:
        route = c.table("users").route
        slot = route.slot(None, b"")
        src = route.only
        assert src is not None and route.shards_for() == [src]
        move = HandMove(service, frozenset({slot}), src, 1 - src)
        move.files = c
        try:
            uid = uuid.uuid4()
            c.put("users", uid, {"email": "a@x.org", "n": 1})
            assert c.lookup("users", "by_email", "a@x.org") == [(uid, {"email": "a@x.org", "n": 1})]
            move.incoming()
            move.freeze()
            move.copy()
            move.switch()  # the old shard keeps its copy of the row (no drop): never read again
            with service.client() as other:
                other.put("users", uid, {"email": "a@x.org", "n": 2})  # on the new shard only
            assert c.routes.version == 0
            assert c.lookup("users", "by_email", "a@x.org") == [(uid, {"email": "a@x.org", "n": 2})]
            assert c.routes.version == 1 and c.table("users").route.only == 1 - src
            assert c.lookup("users", "by_email", "b@x.org") == []
            assert c.counters()["remote_reads"] == 0
        finally:
            move.close()


def test_local_reads_of_a_client_that_learns_the_map_from_a_scan(service: Cluster,
                                                                  move: HandMove) -> None:
    with service.client() as c:
        move.files = c
        moved = moved_keys(c, 3)
        for k in moved:
            c.put("counters", k, 1)
        move.all_of_it()
        assert c.routes.version == 0
        assert c.count("counters") == 3
        assert sorted(c.scan("counters")) == sorted((k, 1) for k in moved)


def test_the_pipelined_writer_applies_every_op_once_across_a_switch(
        service: Cluster, move: HandMove, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmshard.writer")
    c = service.client()
    move.files = c
    try:
        keys = moved_keys(c, 12) + kept_keys(c, 0, 6) + kept_keys(c, 1, 6)
        done = threading.Event()

        def mover() -> None:
            time.sleep(0.1)
            move.incoming()
            move.freeze()
            time.sleep(0.05)  # writes to the moved slots wait meanwhile
            move.copy()
            move.switch()
            move.drop()
            done.set()

        t = threading.Thread(target=mover)
        rounds = 0
        with c.writer(batch_size=7, window=4) as w:
            t.start()
            while not done.is_set() or rounds < 5:
                for k in keys:
                    w.incr("counters", k, 1)
                rounds += 1
                if rounds > 5000:
                    break
        t.join(10)
        assert done.is_set()
        assert c.routes.version == 1
        with service.client() as fresh:
            assert fresh.get_many("counters", keys) == [rounds] * len(keys)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "switching to another shard" in said  # batches waited while frozen
        assert "routed again under slot map version 1" in said  # and were refused after
    finally:
        c.close()


def test_the_async_client_follows_a_moved_slot(service: Cluster, move: HandMove) -> None:
    async def main() -> None:
        async with lmshard.aio.connect(service.config) as ac:
            move.files = ac
            ct = ac.table("counters")
            k = next(f"k{i}" for i in range(10_000)
                     if ct.route.slot(f"k{i}", ct.kenc(f"k{i}")) in MOVED)
            assert await ac.incr("counters", k, 2) == 2
            move.all_of_it()
            assert await ac.incr("counters", k, 1) == 3
            assert ac.routes.version == 1
            assert await ac.get("counters", k) == 3

    asyncio.run(main())
    with service.client() as fresh:
        assert fresh.routes.version == 0
        k = moved_keys(fresh, 1)[0]
        assert fresh.get("counters", k) == 3


def test_a_map_with_more_shards_than_the_config_is_followed(tmp_path: Path) -> None:
    with Cluster(tmp_path / "svc", shards=3, slot_map_version=1) as svc:
        # A client whose config file was written before the service grew to 3 shards.
        text = svc.config_path.read_text()
        old_file = tmp_path / "two-shards.toml"
        old_file.write_text(text.replace("shards = 3\n", "shards = 2\n")
                            .replace("version = 1\n", "version = 0\n"))
        with lmshard.connect(old_file) as c:
            assert c.shards == 2
            new = SlotMap(3, 1024)
            ct = c.table("counters")
            k = next(f"k{i}" for i in range(10_000)
                     if new.assignment[ct.route.slot(f"k{i}", ct.kenc(f"k{i}"))] == 2)
            assert c.incr("counters", k, 3) == 3
            assert (c.shards, c.routes.version) == (3, 1)
            assert c.get("counters", k) == 3
        with lmshard.connect(old_file) as reader:  # learns it from shard 0's records
            assert reader.get("counters", k) == 3
            assert reader.shards == 3
        many = [f"m{i}" for i in range(30)]
        with svc.client() as fresh:
            for m in many:
                fresh.put("items", int(m[1:]), {"group": "g"})
        with lmshard.connect(old_file) as counter:  # plans 2 shards, reads 3 once it knows
            assert counter.count("items") == 30
            assert len(counter.lookup("items", "by_group", "g")) == 30
        with lmshard.connect(old_file) as scanner:
            assert len(list(scanner.scan("items"))) == 30
        with svc.client() as fresh:
            assert fresh.get("counters", k) == 3


def test_slot_routes_adopt_only_a_newer_map_and_reroute_the_tables() -> None:
    from lmshard.client_tables import ClientTables
    from lmshard.slot_routes import SlotRoutes
    from tests.schemas import schema

    routes = SlotRoutes(3, SlotMap(2, 1024))
    tables = ClientTables(schema, routes)
    seen: list[SlotMap] = []
    routes.listen(seen.append)
    ct = tables["counters"]
    k = next(f"k{i}" for i in range(10_000) if ct.route.slot(f"k{i}", ct.kenc(f"k{i}")) in MOVED)
    assert ct.shard(k, ct.kenc(k)) == 0
    moved = SlotMap(3, 1024, [2 if s in MOVED else s * 2 // 1024 for s in range(1024)])
    assert not routes.adopt(3, moved) and not routes.adopt(2, moved)
    assert ct.shard(k, ct.kenc(k)) == 0 and routes.generation == 0 and not seen
    assert routes.adopt(4, moved)
    assert (routes.version, routes.version_bytes, routes.generation) == (4, b"4", 1)
    assert seen == [moved] and routes.shards == 3
    assert ct.shard(k, ct.kenc(k)) == 2 and len(ct.local) == 3
    assert tables.shard_of_op([0, ct.tid, ct.kenc(k), None]) == 2


def test_the_async_writer_applies_every_op_once_across_a_switch(service: Cluster,
                                                                move: HandMove) -> None:
    done = threading.Event()

    def mover() -> None:
        time.sleep(0.1)
        move.incoming()
        move.freeze()
        time.sleep(0.05)
        move.copy()
        move.switch()
        move.drop()
        done.set()

    async def main() -> int:
        async with lmshard.aio.connect(service.config) as ac:
            move.files = ac
            ct = ac.table("counters")
            keys = [f"k{i}" for i in range(40)]
            assert any(ct.route.slot(k, ct.kenc(k)) in MOVED for k in keys)
            t = threading.Thread(target=mover)
            rounds = 0
            async with ac.writer(batch_size=7, window=4) as w:
                t.start()
                while (not done.is_set() or rounds < 5) and rounds < 5000:
                    for k in keys:
                        await w.incr("counters", k, 1)
                    rounds += 1
                    await asyncio.sleep(0)
            t.join(10)
            assert done.is_set() and ac.routes.version == 1
            assert await ac.get_many("counters", keys) == [rounds] * len(keys)
            return rounds

    assert asyncio.run(main()) >= 5
