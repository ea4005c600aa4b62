"""Batching writes for throughput, and retrying the ones that lose a race.

A write transaction costs a commit (an fsync with the default ``sync=True``) whatever it holds,
so one write per transaction is the slowest way to store many rows. Two helpers turn single
writes into batches:

* :class:`WriteBuffer` collects puts, deletes and increments in the calling thread and writes
  them in one ``store.batch()`` once ``max_ops`` are waiting or ``max_delay`` seconds have passed
  since the first (checked on each call), on ``flush()``, and when its ``with`` block ends.
* :class:`BackgroundWriter` hands them to a thread that writes them in batches, so producers
  never wait on LMDB (only on a full queue). ``flush()`` waits until everything enqueued before
  it is committed; a failed batch's error is kept and raised by the next ``flush()`` or
  ``close()``.

Neither makes its writes visible to reads before they are written, and a batch is atomic: a
failed write (a unique index violation, StoreFull) leaves out the whole batch.

:func:`retry` re-runs a function that failed with a transient error (by default a lost
compare-and-set), backing off between attempts.
"""

from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from lmshard.errors import ConflictError, Error, TransactionError

log = logging.getLogger("lmshard.buffer")

DEFAULT_MAX_OPS = 1000
"""Writes per batch: past a few hundred the commit's cost is spread thin."""
DEFAULT_MAX_DELAY = 0.05
"""Seconds (50 ms) a write may wait for more writes to batch with."""
DEFAULT_QUEUE_SIZE = 100_000
"""Writes a BackgroundWriter queues before producers block."""

PUT, DELETE, INCR = "put", "delete", "incr"
Op = tuple[str, Any, Any, Any]
"""A buffered write: (PUT, table, key, value), (DELETE, table, key, None), (INCR, table, key,
delta)."""

T = TypeVar("T")


def apply_ops(b: Any, ops: Iterable[Op]) -> None:
    """Replay buffered writes, in order, inside one write transaction or batch ``b``."""
    put, delete, incr = b.put, b.delete, b.incr
    for kind, table, key, arg in ops:
        if kind is PUT:
            put(table, key, arg)
        elif kind is DELETE:
            delete(table, key)
        else:
            incr(table, key, arg)


def _check_limits(max_ops: int, max_delay: float) -> None:
    if not isinstance(max_ops, int) or max_ops < 1:
        raise ValueError(f"max_ops must be an int >= 1, not {max_ops!r}")
    if not max_delay >= 0:
        raise ValueError(f"max_delay must be >= 0 seconds, not {max_delay!r}")


class WriteBuffer:
    """Writes collected in the calling thread and stored in batches (not thread-safe).

    A flush happens when a write brings the buffer to ``max_ops``, when a write (or
    :meth:`poll`) finds the oldest buffered write ``max_delay`` seconds old, on :meth:`flush`,
    and when the ``with`` block ends. Nothing runs in between: call :meth:`poll` from an idle
    loop, or use :class:`BackgroundWriter`, if writes must not wait for the next call.

    A failed flush raises and keeps the writes buffered (the batch stored nothing), so a
    StoreFull can be fixed and flushed again; :meth:`discard` drops them instead.
    """

    def __init__(
        self,
        store: Any,
        *,
        max_ops: int = DEFAULT_MAX_OPS,
        max_delay: float = DEFAULT_MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_limits(max_ops, max_delay)
        self.store = store
        self.max_ops = max_ops
        self.max_delay = max_delay
        self.flushes = 0
        """Batches written so far."""
        self.written = 0
        """Writes stored so far."""
        self._clock = clock
        self._ops: list[Op] = []
        self._first = 0.0

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"<WriteBuffer {len(self._ops)} pending, {self.written} written>"

    def put(self, table: Any, key: Any, value: Any) -> None:
        """Buffer ``store.put(table, key, value)``."""
        self._add((PUT, table, key, value))

    def delete(self, table: Any, key: Any) -> None:
        """Buffer ``store.delete(table, key)``."""
        self._add((DELETE, table, key, None))

    def incr(self, table: Any, key: Any, delta: int = 1) -> None:
        """Buffer ``store.incr(table, key, delta)``; the new value is not known until it is
        written, so nothing is returned."""
        self._add((INCR, table, key, delta))

    def _add(self, op: Op) -> None:
        ops = self._ops
        ops.append(op)
        now = self._clock()
        if len(ops) == 1:
            self._first = now
        if len(ops) >= self.max_ops or now - self._first >= self.max_delay:
            self.flush()

    def poll(self) -> int:
        """Flush if the oldest buffered write has waited ``max_delay``; returns writes stored."""
        if self._ops and self._clock() - self._first >= self.max_delay:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Store every buffered write in one batch; returns how many were stored."""
        ops = self._ops
        if not ops:
            return 0
        try:
            with self.store.batch() as b:
                apply_ops(b, ops)
        except BaseException as exc:
            exc.add_note(
                f"lmshard.WriteBuffer: the batch of {len(ops)} writes was not stored; they are "
                "still buffered (flush() again, or discard() them)"
            )
            raise
        self._ops = []
        self.flushes += 1
        self.written += len(ops)
        return len(ops)

    def discard(self) -> list[Op]:
        """Drop the buffered writes without storing them; returns them."""
        ops, self._ops = self._ops, []
        return ops

    def __enter__(self) -> WriteBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


_STOP = object()
_WAKE = object()
_live_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for writer in list(_live_writers):
        try:
            writer.close()
        except Exception:
            log.exception("a BackgroundWriter left open failed to store writes at exit")


class BackgroundWriter:
    """A thread that stores queued writes in batches; producers only enqueue.

    Writes are taken in order and stored in batches of up to ``max_ops``, each written at most
    ``max_delay`` seconds after its first write was taken (sooner when a :meth:`flush` asks).
    Producers block only when ``queue_size`` writes are waiting. Thread-safe.

    A batch that fails stores none of its writes: the error is logged on ``lmshard.buffer``,
    kept, and raised by the next :meth:`flush` or :meth:`close` (with a note on how many writes
    were lost); later batches are still written. A writer still open at interpreter exit is
    closed then, its errors logged.
    """

    def __init__(
        self,
        store: Any,
        *,
        max_ops: int = DEFAULT_MAX_OPS,
        max_delay: float = DEFAULT_MAX_DELAY,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        _check_limits(max_ops, max_delay)
        self.store = store
        self.max_ops = max_ops
        self.max_delay = max_delay
        self.flushes = 0
        """Batches stored so far."""
        self.written = 0
        """Writes stored so far."""
        self.lost = 0
        """Writes in batches that failed."""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._enqueued = 0
        self._done = 0
        self._errors: list[BaseException] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmshard-writer", daemon=True)
        self._thread.start()
        _live_writers.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._enqueued - self._done} pending"
        return f"<BackgroundWriter {state}, {self.written} written, {self.lost} lost>"

    # -- producers --------------------------------------------------------------------------

    def put(self, table: Any, key: Any, value: Any) -> None:
        """Queue ``store.put(table, key, value)``."""
        self._submit((PUT, table, key, value))

    def delete(self, table: Any, key: Any) -> None:
        """Queue ``store.delete(table, key)``."""
        self._submit((DELETE, table, key, None))

    def incr(self, table: Any, key: Any, delta: int = 1) -> None:
        """Queue ``store.incr(table, key, delta)``."""
        self._submit((INCR, table, key, delta))

    def _submit(self, op: Op) -> None:
        with self._cond:
            if self._closed:
                raise TransactionError(
                    "this BackgroundWriter is closed", hint="create a new one to write more"
                )
            self._enqueued += 1
        self._queue.put(op)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write queued before this call is stored (or failed), then raise
        the first error of a failed batch since the last flush, if any.

        TimeoutError if that takes more than ``timeout`` seconds.
        """
        with self._cond:
            target = self._enqueued
        if self._done < target:
            self._queue.put(_WAKE)  # don't let the thread wait out max_delay
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._done < target:
                if not self._thread.is_alive():
                    raise Error(
                        "the BackgroundWriter thread has stopped with writes still queued",
                        hint="see the lmshard.buffer log for why",
                    )
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(
                        f"{target - self._done} queued writes were not stored within "
                        f"{timeout} s"
                    )
                self._cond.wait(wait)
        self._raise_errors()

    def close(self, timeout: float | None = None) -> None:
        """Store everything queued, stop the thread, and raise a kept error if any."""
        with self._cond:
            already = self._closed
            self._closed = True
        if not already:
            self._queue.put(_STOP)
            _live_writers.discard(self)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the BackgroundWriter did not finish within {timeout} s")
        self._raise_errors()

    def _raise_errors(self) -> None:
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.add_note(f"lmshard.BackgroundWriter: {len(errors) - 1} more batches failed")
            raise first

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        get, max_ops = self._queue.get, self.max_ops
        stop = False
        while not stop:
            item = get()
            if item is _STOP:
                break
            if item is _WAKE:
                continue
            batch: list[Op] = [item]
            deadline = time.monotonic() + self.max_delay
            while len(batch) < max_ops:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        item = get(timeout=wait)
                    except queue.Empty:
                        break
                if item is _WAKE:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)

    def _write(self, batch: list[Op]) -> None:
        try:
            with self.store.batch() as b:
                apply_ops(b, batch)
        except BaseException as exc:
            log.error(
                "a batch of %d writes failed and was not stored: %s: %s",
                len(batch), type(exc).__name__, exc,
            )
            exc.add_note(
                f"lmshard.BackgroundWriter: a batch of {len(batch)} writes failed and was not "
                "stored"
            )
            with self._cond:
                self._errors.append(exc)
                self.lost += len(batch)
                self._done += len(batch)
                self._cond.notify_all()
            if not isinstance(exc, Exception):
                raise
            return
        with self._cond:
            self.flushes += 1
            self.written += len(batch)
            self._done += len(batch)
            self._cond.notify_all()


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 3,
    backoff: float = 0.01,
    max_backoff: float = 1.0,
    on: tuple[type[BaseException], ...] = (ConflictError,),
) -> T:
    """Call ``fn()``; if it raises one of ``on``, wait and call it again, up to ``attempts``
    calls in all, then let the last error through.

    The waits double from ``backoff`` seconds up to ``max_backoff``, each scaled by a random
    factor in [0.5, 1] so that writers that collided do not collide again in step. Only
    retry what is transient and safe to repeat: a compare-and-set that lost a race
    (ConflictError, the default), never StoreFull or a UniqueViolation.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts!r}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except on as exc:
            if attempt == attempts:
                raise
            delay = min(backoff * 2 ** (attempt - 1), max_backoff) * random.uniform(0.5, 1.0)
            log.debug(
                "attempt %d of %d failed (%s: %s); retrying in %.3fs",
                attempt, attempts, type(exc).__name__, exc, delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
