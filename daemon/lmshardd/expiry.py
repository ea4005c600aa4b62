"""The owner's expiry channel: rows of tables with ttl, and client records nobody can retry.

Rows: a table declared with ``ttl`` keeps an expiry index (``lmshard.txn``). Every
``ROW_SWEEP_INTERVAL``, and at once again while a step came back full, the channel deletes up
to ``txn.EXPIRE_STEP`` expired rows, oldest expiry first, with their index entries, in one
short write transaction between group commits; the deletes are recorded in the change log like
any other. Reads never return an expired row, so the sweep only reclaims the space.

Client records:

Every client id that writes leaves one record per shard (its last sequence number and reply, so
a retried batch is answered, not applied twice). Threads and processes come and go; without
housekeeping the table grows with every client that ever wrote. A client retries a batch for at
most ``timeout_ms`` x (``retries`` + 1), bounded by the config limits to far less than a day, so
a record untouched for ``CLIENT_RECORD_TTL`` (7 days) can never be needed again.

The channel runs in the owner's loop between group commits: every ``SWEEP_INTERVAL`` it walks
``__clients__`` in steps of ``STEP`` records (one short write transaction each, so writers wait
at most one step), deleting expired records. Records written before records carried a time are
stamped with the time of the sweep that first sees them, and expire a TTL later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lmdb
import msgpack

from lmshard.errors import Error
from lmshard.store import grow_map
from lmshard.txn import EXPIRE_STEP, WriteTxn

log = logging.getLogger("lmshardd.expiry")

ROW_SWEEP_INTERVAL = 0.2
"""Seconds between steps of the sweep of expired rows while there is nothing left to do."""

CLIENT_RECORD_TTL = 7 * 24 * 3600
"""Seconds after its last write a client record is forgotten."""
SWEEP_INTERVAL = 3600.0
"""Seconds between sweeps (the first one starts a minute after the owner)."""
STEP = 1000
"""Records looked at per write transaction."""
TIME_FIELD = 4
"""Where a record keeps the time of its last write: [seq, status, reply, older replies, time]."""


def sweep_step(env: lmdb.Environment, db: Any, start: bytes | None, now: float,
               ttl: float = CLIENT_RECORD_TTL, step: int = STEP) -> tuple[bytes | None, int]:
    """Look at up to ``step`` records from key ``start`` (None: the first); delete the expired
    ones, stamp the ones without a time. Returns (where the next step starts or None when the
    table is done, records deleted)."""
    deleted = 0
    stamp = int(now)
    with env.begin(write=True, db=db) as txn:
        cur = txn.cursor(db=db)
        found = cur.set_range(start) if start is not None else cur.first()
        seen = 0
        while found:
            if seen == step:
                return bytes(cur.key()), deleted
            seen += 1
            try:
                rec = msgpack.unpackb(cur.value(), raw=False)
            except Exception:  # never written by an owner of this kind: leave it alone
                found = cur.next()
                continue
            if len(rec) > TIME_FIELD:
                if rec[TIME_FIELD] < now - ttl:
                    cur.delete()  # moves to the next record, if there is one
                    deleted += 1
                    found = bool(cur.key())
                    continue
            else:
                while len(rec) < TIME_FIELD:
                    rec.append([])
                rec.append(stamp)
                cur.put(cur.key(), msgpack.packb(rec, use_bin_type=True))
            found = cur.next()
    return None, deleted


def expire_rows(owner: Any, limit: int = EXPIRE_STEP) -> int:
    """One step of the row sweep on ``owner``: up to ``limit`` expired rows deleted in one
    write transaction, recorded in the change log; the number deleted."""
    env = owner.env
    while True:
        txn = env.begin(write=True)
        try:
            effects: list[Any] | None = [] if owner.changes is not None else None
            n = WriteTxn(txn, owner.tables, log=effects).expire(limit)
            if n == 0:
                txn.abort()
                return 0
            txn_id = txn.id()
            if effects and owner.changes is not None:
                owner.changes.append(txn, txn_id, effects)
            txn.commit()
        except lmdb.MapFullError:  # deletes copy pages too
            txn.abort()
            grow_map(env, owner.config.max_map_size, str(owner.path))
            continue
        except BaseException:
            txn.abort()
            raise
        owner.counters.last_txn_id = txn_id
        return n


class ExpiryChannel:
    """The owner's channel that sweeps expired rows and ``__clients__`` (see the module doc)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.next_sweep = time.monotonic() + 60.0
        self.cursor: bytes | None = None
        self.sweeping = False
        self.deleted = 0
        self.expiring = bool(owner.tables.expiring)
        self.next_row_sweep = 0.0

    def sockets(self) -> list[Any]:
        return []

    def on_readable(self, sock: Any) -> None:  # no sockets of its own
        pass

    def tick(self, now: float) -> None:
        if (self.expiring and now >= self.next_row_sweep and not self.owner.paused
                and not self._moving()):
            self._sweep_rows(now)
        if self.owner.paused or (not self.sweeping and now < self.next_sweep):
            return
        self.sweeping = True
        try:
            self.cursor, n = sweep_step(self.owner.env, self.owner.clients_db, self.cursor,
                                        time.time())
        except lmdb.MapFullError:  # stamping needs room: try again at the next sweep
            self.cursor, n = None, 0
        self.deleted += n
        if self.cursor is None:  # the table is done (or the sweep gave up)
            if self.deleted:
                log.info("shard %d: forgot %d client records older than %d days",
                         self.owner.shard, self.deleted, CLIENT_RECORD_TTL // 86400)
            self.sweeping = False
            self.deleted = 0
            self.next_sweep = now + SWEEP_INTERVAL

    def _moving(self) -> bool:
        """A re-shard is moving slots into or out of this shard: the rows of those slots are
        not its own to expire (the owner of the slots sweeps them, and a move replays or drops
        its deletes), so the row sweep waits until the move is done. Reads never return an
        expired row meanwhile."""
        guard = getattr(self.owner, "guard", None)
        return guard is not None and bool(guard.state.foreign)

    def _sweep_rows(self, now: float) -> None:
        started = time.thread_time()
        try:
            n = expire_rows(self.owner)
        except (Error, lmdb.Error) as exc:  # a full map or disk: the next step tries again
            log.warning("shard %d: expired rows not deleted: %s", self.owner.shard, exc)
            n = 0
        c = self.owner.counters
        c.expired_rows += n
        c.expiry_cpu_seconds += time.thread_time() - started
        if n >= EXPIRE_STEP:  # more are due: the next turn of the loop goes on at once
            self.owner.hurry = True
            self.next_row_sweep = now
        else:
            self.next_row_sweep = now + ROW_SWEEP_INTERVAL

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


def make_channel(owner: Any) -> ExpiryChannel:
    """The expiry channel of ``owner`` (how the owner builds each of its channels)."""
    return ExpiryChannel(owner)
