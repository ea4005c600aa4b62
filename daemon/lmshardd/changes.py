"""The owner side of the change feed: serve the shard's change log to watchers.

Runs in the owner's loop thread as a channel. The log itself is written by the group commit
(``ShardOwner.commit_group`` through ``lmshard.changes.ChangeLog``); this channel only reads it,
in short read transactions, so what it sends is always committed. Each watcher has a position
and credit: after every loop turn (right after a commit's replies went out) the channel sends
each watcher with credit what the log holds past its position, a bounded amount per turn, and
asks the loop for another turn at once while some watcher is behind. A watcher without credit
is simply not sent to: it catches up from the log when credit comes, or gets COMPACTED once its
position is trimmed away. The owner's memory never holds more than one turn's records.

Replicas follow the same way (REPLICATE): a watch of everything, sent each record as it is
stored, with the client records watchers never see (``lmshard.changes.CLIENTS_TABLE_ID``); what
they report applied (APPLIED) goes to the owner's ``lmshardd.replication.Replication``, which
releases the write acks waiting for them. A watch of everything is sent a record as it is stored
only while the record holds no client record; otherwise it is filtered like any other watch.

The socket is a ROUTER with ROUTER_MANDATORY: a send to a watcher whose connection is gone
fails at once and the watch is dropped. Messages are declared in ``lmshard.changes_wire``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from lmshard import security
from lmshard.changes import (
    CLIENTS_MARK,
    SLOTS_MARK,
    ChangeLog,
    Position,
    filter_effects,
    record_effects,
    record_time,
)
from lmshard.changes_wire import (
    APPLIED,
    CANCEL,
    CHANGES,
    COMPACTED,
    CREDIT,
    ERROR,
    MAX_CREDIT,
    PROGRESS,
    REPLICATE,
    STARTED,
    WATCH,
    decode,
    pack,
)
from lmshard.errors import ChangesCompacted, Error, LimitExceeded, ProtocolError
from lmshard.members import HOME
from lmshard.protocol import ZERO_COPY_MIN

log = logging.getLogger("lmshardd.changes")

MAX_WATCHERS = 256
"""Watches one owner serves at once."""
TURN_RECORDS = 512
"""Most log records one loop turn reads for all watchers together."""
TURN_BYTES = 4 * 2**20
"""Most bytes of log records one loop turn reads."""
HEARTBEAT = 1.0
"""Seconds a watcher that is caught up waits at most for a message (PROGRESS if nothing else)."""
IDLE_TRIM_INTERVAL = 10.0
"""Seconds between checks whether an idle log has records past its age bound."""
IDLE_DROP = 300.0
"""Seconds a watch with no credit left is kept before it is dropped (its watcher went away
without a word, or stopped reading for good)."""

_packb = msgpack.Packer(use_bin_type=True).pack
_REPLICA_CODES = (REPLICATE.code, APPLIED.code)


def _sender(frame: bytes) -> str:
    """Who sends a frame: "replica" for REPLICATE and APPLIED, else "watcher" (``decode``
    checks the frame, this only looks at the code's byte)."""
    if len(frame) > 2 and 0x90 <= frame[1] <= 0x9F and frame[2] in _REPLICA_CODES:
        return "replica"
    return "watcher"


def make_channel(owner: Any) -> ChangesChannel | None:
    """Owners with the change log on serve it on their copy's ``changes_endpoint``."""
    changes = owner.store.changes
    if changes is None or not changes.enabled:
        return None
    return ChangesChannel(owner, changes)


@dataclass
class Watcher:
    """One watch: who, what, from where, and how much it may be sent."""

    ident: bytes
    wid: int
    tables: frozenset[bytes] | None
    prefix: bytes | None
    txn: int
    n: int
    credit: int
    seq: int = 0
    last_sent: float = field(default_factory=time.monotonic)
    sent_messages: int = 0
    replica: str | None = None
    """The replica's name for a REPLICATE follow (sent client records too); None for a watch."""

    @property
    def all_changes(self) -> bool:
        return self.tables is None and self.prefix is None


class ChangesChannel:
    """Serves one shard's change log on its own ROUTER socket."""

    def __init__(self, owner: Any, changes: ChangeLog) -> None:
        self.owner = owner
        self.changes = changes
        self.env = owner.env
        self.shard: int = owner.shard
        endpoint = owner.member.changes_endpoint
        sock: zmq.Socket[bytes] = owner.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * 2**20)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)  # credit bounds what is queued, never a silent drop
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[6:]), mode=0o700, exist_ok=True)
        security.secure_server(sock, owner.config, endpoint)
        sock.bind(endpoint)
        self.sock = sock
        self.endpoint = endpoint
        self.watchers: dict[tuple[bytes, int], Watcher] = {}
        self.replica_names: tuple[str, ...] = tuple(
            n for n in (HOME, *owner.config.replica_names) if n != owner.member.name)
        """The copies that may follow this one: every copy of the shard but its own (after a
        failover the home copy follows the promoted one)."""
        self.clients_logged: bool = bool(owner.log_clients)
        """Records may hold client records: a watch of everything is checked for them."""
        self.bad_frames = 0
        self.stale_reads = 0
        """Catch-up reads that did not see the last commit yet (read again next turn)."""
        self.sent_changes = 0
        self._filtered: dict[tuple[Any, ...], tuple[Any, list[int] | None, int]] = {}
        """This turn's messages by (txn, first change, tables, prefix): watchers with the same
        filter at the same place share one decode, filter and pack of the record."""
        self._next_idle_trim = time.monotonic() + IDLE_TRIM_INTERVAL
        log.info("shard %d serves its change log on %s", self.shard, endpoint)

    # -- Channel ---------------------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return [self.sock]

    def on_readable(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.bad_frames += 1
                continue
            ident = frames[0]
            try:
                msg = decode(frames[1:], _sender(frames[1]))
            except Error as exc:
                self.bad_frames += 1
                self._send(ident, [pack(ERROR, 0, exc.code, exc.message, exc.hint or None)])
                continue
            try:
                self._handle(ident, msg.message, msg.watch_id, msg.values)
            except Error as exc:
                self.watchers.pop((ident, msg.watch_id), None)
                self._send(ident, [pack(ERROR, msg.watch_id, exc.code, exc.message,
                                        exc.hint or None)])

    def tick(self, now: float) -> None:
        if self.watchers:
            self._serve(time.monotonic())
        if now >= self._next_idle_trim:
            self._next_idle_trim = now + IDLE_TRIM_INTERVAL
            self._trim_idle()

    def _trim_idle(self) -> None:
        """Trim by age while no commits come (commits trim as they go). Never during a
        backup's pause: no transaction may commit between its cut and its snapshot."""
        if self.owner.paused:
            return
        txn = self.env.begin(write=True)
        try:
            dropped = self.changes.trim(txn)
        except BaseException:
            txn.abort()
            raise
        if dropped:
            txn.commit()
            self.owner.counters.last_txn_id = self.env.info()["last_txnid"]
        else:
            txn.abort()

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        pass

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):  # leave no stale socket file for the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint[6:])

    # -- requests --------------------------------------------------------------------------------

    def _handle(self, ident: bytes, m: Any, wid: int, values: list[Any]) -> None:
        key = (ident, wid)
        if m is WATCH:
            self._watch(ident, wid, *values)
        elif m is CREDIT:
            w = self.watchers.get(key)
            if w is None:
                raise ProtocolError(f"no watch {wid} from this peer (the owner restarted, or the "
                                    "watch ended)", hint="start the watch again from its cursor")
            if w.credit + values[0] > MAX_CREDIT:
                raise LimitExceeded(f"credit of {w.credit + values[0]} messages is over the "
                                    f"limit of {MAX_CREDIT}")
            w.credit += values[0]
        elif m is CANCEL:
            self.watchers.pop(key, None)
        elif m is REPLICATE:
            self._replicate(ident, wid, *values)
        elif m is APPLIED:
            self._applied(key, values[0])

    def _replicate(self, ident: bytes, wid: int, name: str, history: str, txn: int,
                   credit: int) -> None:
        """REPLICATE: follow everything from (history, txn, 0) as replica ``name``; the
        replica's earlier follow, if any, ends."""
        replication = self.owner.replication
        if replication is None or name not in self.replica_names:
            configured = ", ".join(self.replica_names) or "none"
            raise ProtocolError(
                f"{name!r} is not a copy of shard {self.shard} that may follow this one "
                f"({configured} may)",
                hint="start the replica with one of the names in replica.names of the owner's "
                "config")
        old = replication.progress.get(name)
        if old is not None and (old.ident, old.wid) != (ident, wid):
            self.watchers.pop((old.ident, old.wid), None)
        self._watch(ident, wid, history, txn, 0, None, None, credit, replica=name)
        w = self.watchers.get((ident, wid))
        if w is not None:  # it has applied what comes before its position in our history
            replication.follow(name, ident, wid, w.txn - 1 if history else 0)

    def _applied(self, key: tuple[bytes, int], txn: int) -> None:
        """APPLIED: the replica following as ``key`` has applied the log up to ``txn``."""
        w = self.watchers.get(key)
        if w is None or w.replica is None:
            raise ProtocolError(f"APPLIED for follow {key[1]}, which this owner does not serve "
                                "(the owner restarted, or the follow ended)",
                                hint="send REPLICATE again from the first transaction not applied")
        if txn >= w.txn:
            raise ProtocolError(f"APPLIED({txn}): transaction {txn} was not sent yet (the "
                                f"follow is at {w.txn})")
        replication = self.owner.replication
        assert replication is not None
        replication.applied(w.replica, txn)

    def _watch(self, ident: bytes, wid: int, history: str, txn: int | None, n: int,
               tables: list[bytes] | None, prefix: bytes | None, credit: int, *,
               replica: str | None = None) -> None:
        if prefix is not None and (tables is None or len(tables) != 1):
            raise ProtocolError("a key prefix needs exactly one table")
        self.watchers.pop((ident, wid), None)
        if len(self.watchers) >= MAX_WATCHERS:
            raise LimitExceeded(f"shard {self.shard} serves {MAX_WATCHERS} watches already",
                                hint="close watches you no longer read")
        since: Position | str | None
        if txn is None:
            since = None
        elif history == "":
            since = "start"
        else:
            since = Position(history, txn, n)
        last = self.owner.counters.last_txn_id
        try:
            pos = self.changes.resolve(since, last, self.shard)
        except ChangesCompacted as exc:  # its message says why: trimmed, or a new history
            self._send(ident, [pack(COMPACTED, wid, self.changes.history, self.changes.floor,
                                    exc.message)])
            return
        w = Watcher(ident, wid, None if tables is None else frozenset(tables), prefix,
                    pos.txn, pos.n, credit, replica=replica)
        self.watchers[(ident, wid)] = w
        self._send(ident, [pack(STARTED, wid, pos.history, pos.txn, pos.n)])

    # -- sending ---------------------------------------------------------------------------------

    def _serve(self, now: float) -> None:
        last = self.owner.counters.last_txn_id
        behind = [w for w in self.watchers.values() if w.credit > 0 and w.txn <= last]
        if behind:
            self._catch_up(behind, last)
        for key, w in list(self.watchers.items()):
            if w.credit > 0 and w.txn > last and now - w.last_sent >= HEARTBEAT:
                self._progress(w, now)
            elif w.credit == 0 and now - w.last_sent > IDLE_DROP:
                log.info("dropped watch %d of a watcher that took no changes for %.0f s",
                         w.wid, now - w.last_sent)
                del self.watchers[key]
        if any(w.credit > 0 and w.txn <= last for w in self.watchers.values()):
            self.owner.hurry = True  # more to send: no sleep in the next poll

    def _catch_up(self, behind: list[Watcher], last: int) -> None:
        """Send each watcher in ``behind`` what the log holds past its position, as far as
        its credit and this turn's budget allow."""
        if self.changes.floor > min(w.txn for w in behind):
            for w in [w for w in behind if w.txn < self.changes.floor]:
                self._compacted(w)
            behind = [w for w in behind if w.txn >= self.changes.floor]
        budget_records, budget_bytes = TURN_RECORDS, TURN_BYTES
        now = time.monotonic()
        read: dict[int, list[tuple[int, bytes]]] = {}
        self._filtered.clear()
        with self.env.begin() as txn:
            # The end a watcher may be moved to when the log has nothing more for it: what this
            # read sees, never more. A read begun right after a commit can map the meta page
            # before it (a snapshot is never older than its own txn id, but can be older than
            # the last commit); moving a watcher to ``last`` then would skip that commit's
            # record for good.
            last = self._visible_end(txn, last)
            for w in sorted(behind, key=lambda w: w.txn):
                if budget_records <= 0 or budget_bytes <= 0:
                    break
                records = read.get(w.txn)  # watchers at one position (the live tail) share
                if records is None:
                    records = read[w.txn] = self.changes.read(
                        txn, w.txn, max_records=min(budget_records, w.credit * 4),
                        max_bytes=budget_bytes)
                    budget_records -= len(records)
                    budget_bytes -= sum(len(r) for _, r in records)
                for txn_id, record in records:
                    if w.credit == 0 or (w.ident, w.wid) not in self.watchers:
                        break
                    self._send_record(w, txn_id, record, now)
                else:
                    if w.credit > 0 and (w.ident, w.wid) in self.watchers and (
                            not records or records[-1][0] >= last):
                        if w.txn <= last:  # the end of the log: nothing more to send
                            w.txn, w.n = last + 1, 0
                            self._progress(w, now)
        self._filtered.clear()  # what a turn read is not kept past it

    def _visible_end(self, txn: Any, last: int) -> int:
        """The last transaction read ``txn`` sees: ``last``, or less when it does not see the
        last commit yet (then the next turn reads again at once)."""
        visible = int(txn.id())
        if visible >= last:
            return last
        self.stale_reads += 1
        log.debug("shard %d: the log read sees txn %d, the last commit is %d", self.shard,
                  visible, last)
        self.owner.hurry = True
        return visible

    def _send_record(self, w: Watcher, txn_id: int, record: bytes, now: float) -> None:
        first = w.n if txn_id == w.txn else 0
        if first == 0 and (w.replica is not None or (w.all_changes and not (
                (self.clients_logged and CLIENTS_MARK in record) or SLOTS_MARK in record))):
            data: bytes | memoryview = memoryview(record)[8:]
            indexes = None
            count = -1
        else:
            key = (txn_id, first, w.tables, w.prefix)
            message = self._filtered.get(key)
            if message is None:
                effects = record_effects(record)
                idx, picked = filter_effects(effects, first, w.tables, w.prefix)
                if first == 0 and len(picked) == len(effects):  # all of it: as it is stored
                    message = (memoryview(record)[8:], None, len(picked))
                else:
                    message = (_packb(picked) if picked else b"", idx, len(picked))
                self._filtered[key] = message
            data, indexes, count = message
            if not count:
                w.txn, w.n = txn_id + 1, 0  # nothing here for this watch; PROGRESS will say
                return
        w.seq += 1
        if self._send(w.ident, [pack(CHANGES, w.wid, w.seq, txn_id, indexes), data]):
            w.credit -= 1
            w.txn, w.n = txn_id + 1, 0
            w.last_sent = now
            w.sent_messages += 1
            self.sent_changes += count if count >= 0 else 1
        else:
            self.watchers.pop((w.ident, w.wid), None)

    def _progress(self, w: Watcher, now: float) -> None:
        w.seq += 1
        if self._send(w.ident, [pack(PROGRESS, w.wid, w.seq, w.txn)]):
            w.credit -= 1
            w.last_sent = now
        else:
            self.watchers.pop((w.ident, w.wid), None)

    def _compacted(self, w: Watcher) -> None:
        self.watchers.pop((w.ident, w.wid), None)
        self._send(w.ident, [pack(COMPACTED, w.wid, self.changes.history, self.changes.floor,
                                  f"shard {self.shard}'s change log was trimmed past this watch "
                                  f"(it keeps transactions from {self.changes.floor} on)")])

    def _send(self, ident: bytes, frames: list[Any]) -> bool:
        """Send to a watcher; False when its connection is gone (or it cannot take more)."""
        try:  # a copy is cheaper than pyzmq's zero-copy tracking below ZERO_COPY_MIN
            big = len(frames[-1]) >= ZERO_COPY_MIN
            self.sock.send_multipart([ident, *frames], zmq.NOBLOCK, copy=not big)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
            return False

    # -- monitoring ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The log's size and bounds, and each watcher's lag (transactions and seconds)."""
        last = self.owner.counters.last_txn_id
        with self.env.begin() as txn:
            size = self.changes.size(txn)
            oldest, newest = self.changes.bounds(txn)
            records = int(txn.stat(self.changes.db)["entries"])
            watchers = []
            for w in self.watchers.values():
                if w.replica is not None:
                    continue  # the owner's replication stats show replicas
                lag_txns = max(0, last + 1 - w.txn)
                lag_s = 0.0
                if lag_txns:
                    pending = self.changes.read(txn, w.txn, max_records=1)
                    if pending:
                        lag_s = max(0.0, time.time() - record_time(pending[0][1]))
                watchers.append({"watch": w.wid, "lag_txns": lag_txns,
                                 "lag_seconds": round(lag_s, 3), "credit": w.credit,
                                 "messages": w.sent_messages})
        return {
            "history": self.changes.history,
            "bytes": size,
            "records": records,
            "oldest_txn": oldest,
            "newest_txn": newest,
            "floor": self.changes.floor,
            "retain": self.changes.retain,
            "retain_seconds": self.changes.retain_seconds,
            "watchers": watchers,
            "sent_changes": self.sent_changes,
            "bad_frames": self.bad_frames,
            "stale_reads": self.stale_reads,
        }
