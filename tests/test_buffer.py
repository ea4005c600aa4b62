"""Buffered and background writes, and retry(), against a real store."""

from __future__ import annotations

import threading
import time

import pytest

import lmshard
from lmshard.buffer import INCR, PUT, BackgroundWriter, WriteBuffer, retry
from tests.conftest import uid, user


class FakeClock:
    """A clock the test moves by hand, so time-based flushing is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_write_buffer_flushes_when_max_ops_is_reached(store: lmshard.Store) -> None:
    buf = WriteBuffer(store, max_ops=10, max_delay=3600)
    for i in range(9):
        buf.put("blobs", i, b"x")
    assert store.count("blobs") == 0 and len(buf) == 9
    buf.put("blobs", 9, b"x")
    assert store.count("blobs") == 10 and len(buf) == 0
    assert buf.flushes == 1 and buf.written == 10
    for i in range(25):
        buf.put("blobs", 100 + i, b"y")
    assert store.count("blobs") == 30 and len(buf) == 5 and buf.flushes == 3


def test_write_buffer_flushes_when_the_oldest_write_is_max_delay_old(store: lmshard.Store) -> None:
    clock = FakeClock()
    buf = WriteBuffer(store, max_ops=1000, max_delay=0.5, clock=clock)
    buf.put("blobs", 1, b"a")
    clock.now += 0.25
    buf.put("blobs", 2, b"b")
    assert store.count("blobs") == 0
    assert buf.poll() == 0
    clock.now += 0.25  # max_delay since the first write, not since the last
    buf.put("blobs", 3, b"c")
    assert store.count("blobs") == 3 and buf.flushes == 1
    buf.put("blobs", 4, b"d")
    assert buf.poll() == 0
    clock.now += 1
    assert buf.poll() == 1
    assert store.count("blobs") == 4


def test_write_buffer_keeps_order_of_puts_increments_and_deletes(store: lmshard.Store) -> None:
    with WriteBuffer(store) as buf:
        buf.put("counters", "a", 5)
        buf.incr("counters", "a", 2)
        buf.incr("counters", "b")
        buf.put("counters", "c", 1)
        buf.delete("counters", "c")
        assert store.count("counters") == 0  # nothing is written before the block ends
    assert dict(store.scan("counters")) == {"a": 7, "b": 1}
    assert buf.written == 5 and buf.flushes == 1


def test_failed_flush_stores_nothing_and_keeps_the_writes(store: lmshard.Store) -> None:
    buf = WriteBuffer(store, max_ops=100)
    buf.put("users", uid(1), user("a@x.org"))
    buf.put("users", uid(2), user("a@x.org"))  # the same email: the batch fails
    with pytest.raises(lmshard.UniqueViolation) as info:
        buf.flush()
    assert any("still buffered" in note for note in info.value.__notes__)
    assert store.count("users") == 0 and len(buf) == 2
    dropped = buf.discard()
    assert [op[0] for op in dropped] == [PUT, PUT] and len(buf) == 0
    buf.put("users", uid(2), user("b@x.org"))
    assert buf.flush() == 1 and store.count("users") == 1


def test_write_buffer_rejects_bad_limits(store: lmshard.Store) -> None:
    with pytest.raises(ValueError):
        WriteBuffer(store, max_ops=0)
    with pytest.raises(ValueError):
        BackgroundWriter(store, max_delay=-1)


def test_background_writer_stores_everything_in_batches(store: lmshard.Store) -> None:
    with BackgroundWriter(store, max_ops=100, max_delay=1.0) as w:
        for i in range(1000):
            w.put("blobs", i, b"%d" % i)
        w.incr("counters", "n", 5)
        w.flush()  # must not wait out max_delay
        assert store.count("blobs") == 1000 and store.get("counters", "n") == 5
        assert w.written == 1001 and w.flushes >= 11  # at most 100 per batch
        w.delete("blobs", 0)
    assert store.get("blobs", 0) is None  # close() stored the last write


def test_background_writer_writes_without_flush_after_max_delay(store: lmshard.Store) -> None:
    with BackgroundWriter(store, max_ops=1000, max_delay=0.01) as w:
        w.put("blobs", 1, b"x")
        deadline = time.monotonic() + 5
        while store.get("blobs", 1) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.get("blobs", 1) == b"x"


def test_producers_do_not_wait_for_lmdb(store: lmshard.Store) -> None:
    w = BackgroundWriter(store, max_ops=10, max_delay=0.001)
    with store.write() as txn:  # holds LMDB's write lock: the writer thread must wait
        txn.put("blobs", 10_000, b"held")
        for i in range(500):
            w.put("blobs", i, b"x")  # returns at once: only enqueues
        assert w.written == 0
    w.close()
    assert store.count("blobs") == 501


def test_background_writer_reraises_a_failed_batch_on_flush(store: lmshard.Store) -> None:
    w = BackgroundWriter(store, max_ops=1000, max_delay=1.0)
    w.put("users", uid(1), user("a@x.org"))
    w.put("users", uid(2), user("a@x.org"))  # same batch, same email: the batch fails
    with pytest.raises(lmshard.UniqueViolation) as info:
        w.flush()
    assert any("2 writes failed and was not stored" in n for n in info.value.__notes__)
    assert store.count("users") == 0 and w.lost == 2
    w.put("users", uid(3), user("c@x.org"))  # the writer goes on after a failure
    w.flush()  # the error was raised once; this flush is clean
    assert store.count("users") == 1
    w.put("users", uid(4), user("c@x.org"))
    with pytest.raises(lmshard.UniqueViolation):
        w.close()  # close() raises a kept error too
    with pytest.raises(lmshard.TransactionError, match="closed"):
        w.put("users", uid(5), user("e@x.org"))


def test_background_writer_keeps_every_error_until_raised(store: lmshard.Store) -> None:
    w = BackgroundWriter(store, max_ops=1, max_delay=0)
    store.put("users", uid(9), user("taken@x.org"))
    w.put("users", uid(1), user("taken@x.org"))
    w.put("users", uid(2), user("taken@x.org"))
    w.put("blobs", 1, b"fine")
    with pytest.raises(lmshard.UniqueViolation) as info:
        w.close()
    assert any("1 more batches failed" in n for n in info.value.__notes__)
    assert store.get("blobs", 1) == b"fine" and w.lost == 2


def test_flush_from_several_threads(store: lmshard.Store) -> None:
    w = BackgroundWriter(store, max_ops=50, max_delay=0.5)

    def produce(base: int) -> None:
        for i in range(200):
            w.put("blobs", base + i, b"x")
        w.flush()
        assert all(store.get("blobs", base + i) == b"x" for i in range(200))

    threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    assert store.count("blobs") == 800


def test_retry_retries_transient_errors_only() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise lmshard.ConflictError("lost the race")
        return "ok"

    assert retry(flaky, attempts=3, backoff=0.0001) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(lmshard.ConflictError):
        retry(flaky, attempts=2, backoff=0.0001)
    assert len(calls) == 2

    def full() -> None:
        calls.append(1)
        raise lmshard.StoreFull("full")

    calls.clear()
    with pytest.raises(lmshard.StoreFull):
        retry(full, attempts=5)
    assert len(calls) == 1


def test_retry_makes_a_cas_read_modify_write_win(store: lmshard.Store) -> None:
    store.put("counters", "balance", 100)
    interfere = [True]

    def withdraw() -> int:
        current = store.get("counters", "balance")
        if interfere[0]:  # another writer changes the row between our read and our write
            interfere[0] = False
            store.put("counters", "balance", 90)
        with store.batch() as b:
            b.cas("counters", "balance", current - 30, expected=current)
        return current - 30

    assert retry(withdraw, backoff=0.0001) == 60
    assert store.get("counters", "balance") == 60
    assert INCR == "incr"
