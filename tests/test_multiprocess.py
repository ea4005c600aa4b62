"""Several processes on one store: readers keep reading while the writer grows the map."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import lmshard
from tests.conftest import make_schema

ROWS = 3000
VALUE = bytes(range(256)) * 8  # the same in every spawned process


def _reader(path: str, stop: mp.synchronize.Event, out: mp.Queue,  # type: ignore[name-defined]
            ready: mp.Queue) -> None:  # type: ignore[name-defined]
    schema = make_schema()
    seen_max = 0
    reads = 0
    try:
        with lmshard.open(path, schema, readonly=True) as store:
            store.count("blobs")
            ready.put(True)  # the writer starts growing the map once every reader reads
            while not stop.is_set():
                # One snapshot for the count and the rows: two read transactions begun one after
                # the other while commits land may see a commit and then the one before it
                # (measured with plain py-lmdb too); a read begun after a commit was acked sees it.
                with store.read() as r:
                    n = r.count("blobs")
                    if n:
                        # every key below the count is present: the writer commits in key order
                        assert r.get("blobs", n - 1) == VALUE
                        vals = r.get_many("blobs", range(max(0, n - 50), n))
                        assert all(v == VALUE for v in vals)
                assert store.get("blobs", 0) == VALUE  # a snapshot of its own, through a grown map
                seen_max = max(seen_max, n)
                reads += 1
        out.put(("ok", seen_max, reads))
    except BaseException as exc:  # report, don't hang the parent
        out.put(("error", repr(exc), reads))


def test_readers_survive_map_growth_by_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    schema = make_schema()
    ctx = mp.get_context("spawn")
    with lmshard.open(path, schema, map_size=128 * 1024, max_map_size=1 << 30) as writer:
        writer.put("blobs", 0, VALUE)
        stop = ctx.Event()
        out, ready = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_reader, args=(path, stop, out, ready)) for _ in range(4)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        initial = writer.stats()["env"]["map_size"]
        for i in range(1, ROWS):
            with writer.batch() as b:
                b.put("blobs", i, VALUE)
        grown = writer.stats()["env"]["map_size"]
        stop.set()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    assert grown >= 16 * initial  # the map grew several times while readers were reading
    assert all(r[0] == "ok" for r in results), results
    assert all(r[2] > 0 for r in results)
    assert max(r[1] for r in results) > 1
