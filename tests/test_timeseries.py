"""Time series in chunk rows: appends, exact range trimming across chunks, downsampling."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmshard
from lmshard.testing import assert_consistent
from lmshard.timeseries import HEAD_TS, OutOfOrder, TimeSeries

TICKS_ID = "7d3e9b1a-2c4f-4a6e-8b0d-1f3a5c7e9b21"
COUNTS_ID = "8e4f0c2b-3d5a-4b7f-9c1e-2a4b6d8f0c32"
SEC = 10**9


def make() -> tuple[lmshard.Schema, TimeSeries, TimeSeries]:
    schema = lmshard.Schema("ts")
    ticks = TimeSeries(schema, "ticks", table_id=TICKS_ID, chunk_rows=4)
    counts = TimeSeries(schema, "counts", table_id=COUNTS_ID, series_key="uint64", dtype="int64")
    return schema, ticks, counts


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[lmshard.Store, TimeSeries, TimeSeries]]:
    schema, ticks, counts = make()
    with lmshard.open(tmp_path / "s", schema, sync=False) as store:
        yield store, ticks, counts


def test_declares_a_table_keyed_by_series_and_timestamp() -> None:
    schema, ticks, counts = make()
    assert schema["ticks"] is ticks.table
    assert ticks.table.key.spec == ("str", "timestamp")
    assert counts.table.key.spec == ("uint64", "timestamp")
    assert ticks.table.value.name == "numpy"
    assert "chunk" in (ticks.table.doc or "")


def test_range_concatenates_chunks_and_trims_exactly(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    ts = np.arange(0, 30, 3, dtype=np.int64)  # 0, 3, ..., 27
    vs = ts * 1.5
    ticks.append(store, "a", ts[:2], vs[:2])
    ticks.append(store, "a", ts[2:3], vs[2:3])  # fits in the tail's room: into it
    ticks.append(store, "a", ts[3:6], vs[3:6])  # 3 points, room for 1: a new chunk from 9
    ticks.append(store, "a", ts[6:], vs[6:])  # a whole chunk's worth: a new chunk from 18
    chunk_starts = [k[1] for k, _ in store.scan("ticks", prefix=("a",))]
    assert chunk_starts == [HEAD_TS, 0, 9, 18]
    assert [len(c["t"]) for _, c in store.scan("ticks", prefix=("a",), start=("a", 0))] == [
        3, 3, 4]
    got_t, got_v = ticks.range(store, "a")
    assert got_t.tolist() == ts.tolist() and got_v.tolist() == vs.tolist()
    cases = [(None, None), (0, 30), (1, 29), (3, 27), (12, 24), (11, 13), (13, 14), (27, 28),
             (28, None), (None, 0), (None, 1), (-100, 4), (10, 10), (20, 5), (100, 200)]
    for start, end in cases:
        got_t, got_v = ticks.range(store, "a", start, end)
        mask = np.ones(len(ts), bool)
        if start is not None:
            mask &= ts >= start
        if end is not None:
            mask &= ts < end
        assert got_t.tolist() == ts[mask].tolist(), (start, end)
        assert got_v.tolist() == vs[mask].tolist(), (start, end)
        assert got_t.dtype == np.int64 and got_v.dtype == np.float64
    assert ticks.info(store, "a") == {"last": 27, "tail_start": 18, "points": 10}
    assert ticks.range(store, "nothing")[0].tolist() == []


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-(10**15), 10**15), min_size=1, max_size=60, unique=True),
    st.lists(st.integers(1, 13), min_size=1, max_size=10),
    st.integers(-(10**15), 10**15),
    st.integers(0, 10**15),
)
def test_range_matches_a_mask_for_any_split(
    tmp_path_factory: pytest.TempPathFactory, stamps: list[int], splits: list[int], lo: int,
    width: int,
) -> None:
    ts = np.array(sorted(stamps), dtype=np.int64)
    vs = np.arange(len(ts), dtype=np.float64)
    schema, ticks, _ = make()
    with lmshard.open(tmp_path_factory.mktemp("h"), schema, sync=False) as store:
        pos = 0
        for size in itertools.cycle(splits):
            if pos >= len(ts):
                break
            ticks.append(store, "s", ts[pos : pos + size], vs[pos : pos + size])
            pos += size
        got_t, got_v = ticks.range(store, "s", lo, lo + width)
        mask = (ts >= lo) & (ts < lo + width)
        assert got_t.tolist() == ts[mask].tolist()
        assert got_v.tolist() == vs[mask].tolist()
        all_t, _ = ticks.range(store, "s")
        assert all_t.tolist() == ts.tolist()
        assert ticks.info(store, "s")["points"] == len(ts)  # type: ignore[index]
        assert_consistent(store)


def test_series_are_kept_apart(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, counts = setup
    ticks.append(store, "a", [1, 2, 3], [1.0, 2.0, 3.0])
    ticks.append(store, "ab", [1, 2], [10.0, 20.0])  # "a" is a prefix of "ab" as a string
    ticks.append(store, "b", [0, 5], [7.0, 8.0])
    assert ticks.range(store, "a")[1].tolist() == [1.0, 2.0, 3.0]
    assert ticks.range(store, "ab")[1].tolist() == [10.0, 20.0]
    assert ticks.range(store, "b", 1)[1].tolist() == [8.0]
    counts.append(store, 7, [10, 20], [1, 2])
    t, v = counts.range(store, 7)
    assert v.dtype == np.int64 and v.tolist() == [1, 2]
    assert ticks.drop(store, "a") == 3
    assert ticks.range(store, "a")[0].tolist() == []
    assert ticks.info(store, "a") is None
    assert ticks.range(store, "ab")[1].tolist() == [10.0, 20.0]


def test_out_of_order_is_refused_and_writes_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    ticks.append(store, "a", [10, 20], [1.0, 2.0])
    before = store.count("ticks")
    with pytest.raises(OutOfOrder, match=r"timestamps\[2\] = 25 is not after timestamps\[1\] = 30"):
        ticks.append(store, "a", [21, 30, 25], [1.0, 2.0, 3.0])
    with pytest.raises(OutOfOrder, match="not after the last stored one, 20"):
        ticks.append(store, "a", [20, 40], [1.0, 2.0])
    with pytest.raises(OutOfOrder, match="not after"):
        ticks.append(store, "a", [31, 31], [1.0, 2.0])  # equal is not increasing
    with pytest.raises(OutOfOrder, match="reserved"):
        ticks.append(store, "new", [HEAD_TS], [1.0])
    assert store.count("ticks") == before
    assert ticks.range(store, "a")[0].tolist() == [10, 20]
    assert isinstance(OutOfOrder("x"), ValueError) and isinstance(OutOfOrder("x"), lmshard.Error)


def test_input_checks(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, counts = setup
    with pytest.raises(ValueError, match="one value per timestamp"):
        ticks.append(store, "a", [1, 2], [1.0])
    with pytest.raises(TypeError, match="do not fit"):
        counts.append(store, 1, [1], [1.5])  # float into an int64 series
    with pytest.raises(TypeError, match="ints"):
        ticks.append(store, "a", [1.5], [1.0])
    assert ticks.append(store, "a", [], []) == 0
    assert ticks.append(store, "a", np.array([1, 2], dtype=np.int32), [1, 2]) == 2  # int -> float
    with pytest.raises(lmshard.SchemaError):
        TimeSeries(lmshard.Schema("x"), "t", table_id=TICKS_ID, dtype=object)


def test_datetime_inputs(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    stamps = np.array(["2026-11-27T10:00:00", "2026-11-27T10:00:01"], dtype="datetime64[s]")
    ticks.append(store, "a", stamps, [1.0, 2.0])
    ns = stamps.astype("datetime64[ns]").astype(np.int64)
    assert ticks.range(store, "a")[0].tolist() == ns.tolist()
    start = dt.datetime(2026, 11, 27, 10, 0, 1)  # naive: UTC
    assert ticks.range(store, "a", start)[1].tolist() == [2.0]
    aware = dt.datetime(2026, 11, 27, 11, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert ticks.range(store, "a", end=aware)[1].tolist() == []
    assert ticks.range(store, "a", np.datetime64("2026-11-27T10:00:00.5"))[1].tolist() == [2.0]


def test_downsample_every_aggregate(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    ts = np.array([0, 1, 9, 10, 25, 29, 41], dtype=np.int64) * SEC
    vs = np.array([1.0, 3.0, 2.0, 4.0, 10.0, -2.0, 5.0])
    ticks.append(store, "a", ts, vs)
    every = 10 * SEC
    expect = {
        "mean": [2.0, 4.0, 4.0, 5.0],
        "sum": [6.0, 4.0, 8.0, 5.0],
        "min": [1.0, 4.0, -2.0, 5.0],
        "max": [3.0, 4.0, 10.0, 5.0],
        "first": [1.0, 4.0, 10.0, 5.0],
        "last": [2.0, 4.0, -2.0, 5.0],
        "count": [3, 1, 2, 1],
    }
    for how, values in expect.items():
        out_t, out_v = ticks.downsample(store, "a", 0, 50 * SEC, every, how)
        assert out_t.tolist() == [0, 10 * SEC, 20 * SEC, 40 * SEC], how  # bucket 30 is empty
        assert out_v.tolist() == values, how
    # Buckets align to the epoch whatever the start; the range still trims the points.
    out_t, out_v = ticks.downsample(store, "a", 5 * SEC, 30 * SEC, every, "sum")
    assert out_t.tolist() == [0, 10 * SEC, 20 * SEC] and out_v.tolist() == [2.0, 4.0, 8.0]
    out_t, out_v = ticks.downsample(store, "a", None, None, every, "count", origin=5 * SEC)
    assert out_t.tolist() == [-5 * SEC, 5 * SEC, 25 * SEC, 35 * SEC]
    assert out_v.tolist() == [2, 2, 2, 1]
    empty_t, empty_v = ticks.downsample(store, "a", 100 * SEC, 200 * SEC, every)
    assert empty_t.size == 0 and empty_v.dtype == np.float64
    with pytest.raises(ValueError):
        ticks.downsample(store, "a", 0, 1, 0)
    with pytest.raises(ValueError):
        ticks.downsample(store, "a", 0, 1, 10, "median")


def test_many_points_in_one_append(setup) -> None:  # type: ignore[no-untyped-def]
    store, _, counts = setup
    n = 100_000
    ts = np.arange(n, dtype=np.int64) * SEC
    counts.append(store, 1, ts, np.arange(n))
    assert store.count("counts") == 1 + -(-n // 1024)
    t, v = counts.range(store, 1, 1000 * SEC, 99_000 * SEC)
    assert t[0] == 1000 * SEC and t[-1] == 98_999 * SEC and v.sum() == sum(range(1000, 99_000))
    _, per_hour = counts.downsample(store, 1, None, None, 3600 * SEC, "count")
    assert per_hour.sum() == n


class Interleaved:
    """The real store, but another append to the same series lands between this append's read
    and its batch (the race the head row's compare-and-set guards against)."""

    def __init__(self, store: lmshard.Store, other: Any) -> None:
        self.store = store
        self.other = other
        self.batches = 0

    def read(self) -> Any:
        return self.store.read()

    @contextmanager
    def batch(self) -> Iterator[Any]:
        self.batches += 1
        if self.other is not None:
            other, self.other = self.other, None
            other()
        with self.store.batch() as b:
            yield b


def test_a_concurrent_append_is_detected_and_retried(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    ticks.append(store, "a", [1, 2, 3], [1.0, 2.0, 3.0])
    racer = Interleaved(store, lambda: ticks.append(store, "a", [4, 5], [4.0, 5.0]))
    ticks.append(racer, "a", [6, 7], [6.0, 7.0])  # after the other's points: retried, stored
    assert racer.batches == 2
    assert ticks.range(store, "a")[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    racer = Interleaved(store, lambda: ticks.append(store, "a", [8, 20], [8.0, 20.0]))
    with pytest.raises(OutOfOrder, match="not after the last stored one, 20"):
        ticks.append(racer, "a", [9, 10], [9.0, 10.0])  # would interleave: refused on retry
    assert ticks.range(store, "a")[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 20]


def test_appends_from_threads_to_their_own_series(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup

    def writer(name: str) -> None:
        for i in range(20):
            ticks.append(store, name, [i * 10, i * 10 + 1], [float(i), float(i)])

    threads = [threading.Thread(target=writer, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert len(ticks.range(store, f"s{i}")[0]) == 40


class WithoutReadTxns:
    """The shape of the daemon client's data API: get, scan and batch, no read transactions."""

    def __init__(self, store: lmshard.Store) -> None:
        self.get, self.scan, self.batch = store.get, store.scan, store.batch


def test_works_with_a_store_api_without_read_transactions(setup) -> None:  # type: ignore[no-untyped-def]
    store, ticks, _ = setup
    client = WithoutReadTxns(store)
    assert not hasattr(client, "read")
    ticks.append(client, "a", [1, 2, 3, 5, 8], [1.0, 2.0, 3.0, 5.0, 8.0])
    ticks.append(client, "a", [13, 21], [13.0, 21.0])
    assert ticks.range(client, "a", 2, 13)[0].tolist() == [2, 3, 5, 8]
    assert ticks.info(client, "a") == {"last": 21, "tail_start": 8, "points": 7}
    with pytest.raises(OutOfOrder):
        ticks.append(client, "a", [20], [0.0])
    assert ticks.drop(client, "a") == 7 and store.count("ticks") == 0


def test_a_series_lives_on_one_shard() -> None:
    _, ticks, _ = make()
    shard_key = ticks.table.shard_key
    assert shard_key is not None and shard_key(("web-1", 123)) == "web-1"
