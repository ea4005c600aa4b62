"""Forget client records nobody can retry any more: the owner's ``__clients__`` housekeeping.

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

log = logging.getLogger("lmshardd.expiry")

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


class ExpiryChannel:
    """The owner's channel that sweeps ``__clients__`` now and then (see the module doc)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.next_sweep = time.monotonic() + 60.0
        self.cursor: bytes | None = None
        self.sweeping = False
        self.deleted = 0

    def sockets(self) -> list[Any]:
        return []

    def on_readable(self, sock: Any) -> None:  # no sockets of its own
        pass

    def tick(self, now: float) -> None:
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

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


def make_channel(owner: Any) -> ExpiryChannel:
    """The expiry channel of ``owner`` (how the owner builds each of its channels)."""
    return ExpiryChannel(owner)
