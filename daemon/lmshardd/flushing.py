"""Flushing a shard to disk every ``durability.flush_interval`` seconds instead of every commit.

With a flush interval the owner opens its environment without LMDB's fsync on commit
(MDB_NOSYNC, py-lmdb's ``sync=False``): a commit is written to the OS, into the page cache, and
acked then, so a crash of the owner process loses nothing (the next owner maps the same pages).
``IntervalFlush`` calls ``env.sync(True)`` (an fdatasync of the data file, which covers every
commit before it) once the last flush is ``flush_interval`` old and something was committed
since: on the commit path when a busy owner's commit finds it due (before that group's acks go
out), between loop turns otherwise, and once when the owner stops cleanly. An OS crash or power
loss therefore loses at most the commits since the last flush.

LMDB's caveat for MDB_NOSYNC holds for that crash: only "if the filesystem preserves write order
and MDB_WRITEMAP is not used" (it is not) do transactions keep atomicity and consistency and
lose only durability. On a filesystem that may reorder writes (ext4 and XFS may, for pages
written in place) the meta page of an unflushed commit can reach the disk before its data
pages, and the store can be damaged. MDB_NOMETASYNC would avoid that but still fsyncs each
commit's data, so it gives no time window.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lmdb
import zmq

from lmshard.config import Config
from lmshardd.owner_state import OwnerCounters

log = logging.getLogger("lmshardd.owner")

MODE_FSYNC = "fsync"
"""Each commit is fsynced before its ack (``flush_interval`` 0, ``sync`` true)."""
MODE_INTERVAL = "interval"
"""Commits are acked once written to the OS; the owner flushes every ``flush_interval``."""
MODE_OS = "os"
"""``sync`` false: commits are acked once written to the OS, which writes them back itself."""


def sync_each_commit(config: Config) -> bool:
    """Whether the owner opens its environment with an fsync per commit: ``durability.sync``
    unless a flush interval takes that fsync's place."""
    return config.sync and not config.flush_interval


class IntervalFlush:
    """Flushes ``env`` when its last flush is ``interval`` seconds old and something was
    committed since; counts each flush in ``counters``. A channel of the owner (no sockets):
    ``after_commit`` and ``tick`` flush when due, ``close`` flushes what is left."""

    def __init__(self, env: lmdb.Environment, interval: float, counters: OwnerCounters,
                 shard: int) -> None:
        self.env, self.interval, self.counters, self.shard = env, interval, counters, shard
        self._flushed_txn = -1
        self._due = 0.0
        self.flush(time.monotonic())  # what opening the store committed

    def flush(self, now: float) -> None:
        """Flush if anything was committed since the last flush; the next is due an interval
        from ``now`` (monotonic). A failed flush is raised: acked commits may not be on disk,
        and the owner stops rather than carry on as if they were."""
        txn_id = self.env.info()["last_txnid"]
        if txn_id != self._flushed_txn:
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                log.error("shard %d: flushing to disk failed (%s); the commits acked since the "
                          "last flush (txn %d) may not be on disk", self.shard, exc,
                          self._flushed_txn)
                raise
            self._flushed_txn = txn_id
            self.counters.flushes += 1
            self.counters.last_flush_time = time.time()
        self._due = now + self.interval

    # -- the Channel protocol ----------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return []

    def on_readable(self, sock: zmq.Socket[bytes]) -> None:  # pragma: no cover - never polled
        pass

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        now = time.monotonic()
        if now >= self._due:
            self.flush(now)

    def tick(self, now: float) -> None:
        if now >= self._due:
            self.flush(now)

    def close(self) -> None:
        self.flush(time.monotonic())


def make_channel(owner: Any) -> IntervalFlush | None:
    """The flusher of ``owner`` when ``durability.flush_interval`` is on; None otherwise (LMDB
    fsyncs each commit, or ``sync`` is false). The owner makes it as soon as its store is open,
    not with the channels it loads later: an environment opened without an fsync per commit
    must never go unflushed."""
    interval = owner.config.flush_interval
    if not interval:
        return None
    return IntervalFlush(owner.env, interval, owner.counters, owner.shard)


def durability(env: lmdb.Environment, config: Config, counters: OwnerCounters
               ) -> dict[str, Any]:
    """What the owner's health says about durability: the mode (whether commits are fsynced
    is read from the environment's own flags) and the unix time of the owner's last flush by
    interval (0 if none)."""
    if env.flags()["sync"]:
        mode = MODE_FSYNC
    else:
        mode = MODE_INTERVAL if config.flush_interval else MODE_OS
    return {"durability": mode, "last_flush": counters.last_flush_time}
