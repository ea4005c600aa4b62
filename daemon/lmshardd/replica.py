"""A replica: one process keeps one copy of one shard in step with the shard's primary.

``lmshardd replica --shard N --name R`` holds copy R of shard N (``config.member(N, R)``: its
own LMDB environment and endpoints). It

- takes a *snapshot* of the primary's copy through the primary's backup channel (a compacted
  LMDB copy at the primary's txn id S, ``take_shard_snapshot``), in a thread, while it keeps
  answering. The first one becomes the environment (renamed into place); a later one (the
  primary's log no longer holds what the copy needs, or it follows another history) is loaded
  into the live environment in one write transaction, so processes reading the copy switch
  from the old state to the new at once and never see a half-loaded one;
- *follows* the primary's change log from S + 1 (REPLICATE on its changes endpoint, credit as
  ``lmshard.watch`` grants it) and applies each primary transaction in one local write
  transaction: rows through the table code (``WriteTxn.put_raw`` / ``delete_raw``, so indexes
  and the expiry index stay in step), the clients' sequence records into ``__clients__``, the
  same effects into the copy's own change log (so the copy, once promoted, serves watchers and
  replicas), and ``replica_applied`` = the primary's txn id into the meta database. After each
  commit it tells the primary APPLIED. A gap, silence or an error: it subscribes again from
  ``replica_applied + 1``; COMPACTED (or a history that is not its own): a new snapshot;
- answers at its request endpoint: PING (health with its role, epoch, applied txn and lag),
  the read commands from its own copy, writes with NotPrimary naming the primary, and PROMOTE,
  upon which it becomes the shard's owner in this same process (``ShardOwner`` on its own
  copy and endpoints, taking over its request socket).

It never expires rows itself: the primary's expiry deletes come through the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import zmq

from lmshard import protocol, security
from lmshard.changes import (
    CHANGES_DB,
    CLIENTS_TABLE_ID,
    META_FLOOR,
    META_HISTORY,
    META_ON,
    SLOTS_TABLE_ID,
)
from lmshard.changes_wire import (
    APPLIED,
    CANCEL,
    CHANGES,
    COMPACTED,
    CREDIT,
    ERROR,
    PROGRESS,
    REPLICATE,
    STARTED,
    decode,
    pack,
)
from lmshard.config import Config
from lmshard.copies import ping_copies, primary_of
from lmshard.errors import (
    ChangesCompacted,
    Error,
    InternalError,
    InvalidCursor,
    NotPrimary,
    ProtocolError,
    ShardUnavailable,
)
from lmshard.map_growth import grow_map
from lmshard.members import (
    META_REPLICA_APPLIED,
    META_REPLICA_APPLIED_EPOCH,
    PRIMARY,
    REPLICA,
    Member,
    MemberState,
    read_state,
    state_records,
)
from lmshard.named_dbs import named_dbs
from lmshard.shard_identity import check_shard_identity, identity_records
from lmshard.slot_state import SlotState
from lmshard.store import Store
from lmshard.store_meta import MAX_DBS, META_DB, meta_records
from lmshard.txn import WriteTxn
from lmshardd import stats
from lmshardd.membership import decide_start
from lmshardd.owner import CLIENTS_DB, ShardOwner, request_socket, run_owner, serve
from lmshardd.slot_guard import RecordedSlots, read_guarded

log = logging.getLogger("lmshardd.replica")

CREDIT_WINDOW = 64
"""Messages the primary may send before the replica grants more (half a window at a time)."""
SILENCE = 3.0
"""Seconds without a word from the primary (it sends PROGRESS every second) before the
replica looks for the primary again and subscribes anew."""
POLL_MS = 100
"""How long the loop waits for a request or a change before it looks at its timers."""
RETRY_DELAY = 1.0
"""Seconds between attempts at a snapshot or a subscription that failed."""
SNAPSHOT_DIR = ".snapshot"
"""Suffix of the directory beside the copy a snapshot is received into."""

CONNECTING = "connecting"
SNAPSHOT = "snapshot"
FOLLOWING = "following"
PROMOTING = "promoting"
_CHANGE_LOG_RECORDS = (META_HISTORY, META_FLOOR, META_ON)


class ReplicaDiverged(Error):
    """What the primary sent does not apply to this copy (a unique value taken, a table the
    schema does not know): the copy is replaced by a new snapshot."""


class Replica:
    """Copy ``name`` of shard ``shard``: snapshot, follow, answer, and promotion to owner."""

    def __init__(self, config: Config, shard: int, name: str, state: MemberState, *,
                 schema: Any = None) -> None:
        self.config = config
        self.shard = shard
        self.member: Member = config.member(shard, name)
        self.name = self.member.name
        self.schema = schema if schema is not None else config.load_schema()
        self.schema.check_sharded(config.shards)
        self.state = replace(state, role=REPLICA)
        self.phase = CONNECTING
        self.store: Store | None = None
        self.meta_db: Any = None
        self.clients_db: Any = None
        self.slots = RecordedSlots(shard, config)
        """The slot state the copy's reads go by, as its primary recorded it."""
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock: zmq.Socket[bytes] | None = None
        self.feed: zmq.Socket[bytes] | None = None
        self.wid = 0
        self.seq = 0
        self.received = 0
        self.heard = 0.0
        self.primary_last = state.applied
        """The primary's last txn id this copy knows of (from CHANGES and PROGRESS)."""
        self.caught_up_at = time.time()
        self.started = time.time()
        self.need_snapshot = False
        self.snapshot_thread: _SnapshotTaker | None = None
        self.retry_at = 0.0
        self.stopping = False
        self.owner: ShardOwner | None = None
        """Set once PROMOTE made this process the shard's owner."""
        self.applied_txns = 0
        self.snapshots = 0
        if (self.member.dir / "data.mdb").exists():
            self._open_store()
            if state != self._read_state():
                self._write_state(self.state)
        if self.store is None or not self.state.replica_history or not self.state.applied:
            self.need_snapshot = True

    # -- the copy --------------------------------------------------------------------------------

    def _open_store(self) -> None:
        c = self.config
        self.store = Store(
            self.member.dir, self.schema, map_size=c.map_size, max_map_size=c.max_map_size,
            sync=c.sync, metasync=c.metasync, max_readers=c.max_readers,
            on_open=self._check_identity, changes=c.changes_enabled,
            changes_retain=c.changes_retain, changes_retain_seconds=c.changes_retain_seconds)
        env = self.store.env
        self.meta_db = env.open_db(META_DB)
        self.clients_db = env.open_db(CLIENTS_DB)

    def _check_identity(self, txn: lmdb.Transaction, meta_db: Any,
                        meta: dict[bytes, bytes]) -> None:
        check_shard_identity(self.config, self.shard, self.schema, meta, self.member.dir)
        for key, value in identity_records(self.config, self.shard, meta).items():
            txn.put(key, value, db=meta_db)

    def _read_state(self) -> MemberState:
        assert self.store is not None
        with self.store.env.begin() as txn:
            meta = {k: txn.get(k, db=self.meta_db) for k in state_records(self.state)}
        return read_state({k: v for k, v in meta.items() if v is not None}, self.name)

    def _write_state(self, state: MemberState) -> None:
        """Record ``state`` in the copy's meta database (durably, in a transaction of its own)."""
        assert self.store is not None
        self._write(lambda txn: _put_state(txn, self.meta_db, state))
        self.state = state

    def _write(self, body: Any) -> None:
        """Run ``body(txn)`` in one write transaction of the copy; the map grows if full."""
        assert self.store is not None
        env = self.store.env
        while True:
            txn = env.begin(write=True)
            try:
                body(txn)
                txn.commit()
                return
            except lmdb.MapFullError:
                txn.abort()
                grow_map(env, self.config.max_map_size, str(self.member.dir))
            except BaseException:
                txn.abort()
                raise

    # -- serving ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the copy's request endpoint, with the options an owner's socket has (the owner
        this process may become takes it over)."""
        endpoint = self.member.endpoint
        self.sock = request_socket(self.ctx, self.config, endpoint)
        log.info("shard %d: replica %s of %s at %s (pid %d), copy %s", self.shard, self.name,
                 self.state.primary, endpoint, os.getpid(), self.member.dir)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def serve_forever(self) -> None:
        """Follow and answer until SIGTERM/SIGINT, or until PROMOTE made this process the
        owner (``self.owner``; the caller serves it)."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        while not self.stopping and self.owner is None:
            self._housekeeping(time.monotonic())
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            if self.feed is not None:
                poller.register(self.feed, zmq.POLLIN)
            ready = dict(poller.poll(POLL_MS))
            if self.feed is not None and self.feed in ready:
                self._drain_feed()
            if self.sock in ready:
                self._serve_requests()
        if self.owner is None:
            self.close()

    def _housekeeping(self, now: float) -> None:
        """Between turns: start or finish a snapshot, subscribe, notice a silent primary."""
        if self.need_snapshot and self.snapshot_thread is None and now >= self.retry_at:
            self._start_snapshot()
        if self.snapshot_thread is not None and not self.snapshot_thread.is_alive():
            self._finish_snapshot()
        if (self.feed is None and not self.need_snapshot and self.store is not None
                and now >= self.retry_at):
            self._subscribe()
        elif self.feed is not None and now - self.heard > SILENCE:
            log.warning("shard %d: no word from %s for %.0f s; looking for the primary",
                        self.shard, self.state.primary, SILENCE)
            self._find_primary()
            self._close_feed()

    def _serve_requests(self) -> None:
        assert self.sock is not None
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            ident, frame = frames
            reply = self._answer(ident, frame)
            if reply is not None:
                self.sock.send_multipart([ident, reply])
            if self.owner is not None:
                return  # the owner serves what is left on the socket

    def _answer(self, ident: bytes, frame: bytes) -> bytes | None:
        seq = 0
        try:
            code, _cid, seq, body, epoch, rv = protocol.unpack_request(frame)
            cmd = protocol.BY_CODE.get(code)
            if cmd is None:
                raise ProtocolError(f"unknown command code {code}")
            if cmd is protocol.PROMOTE:
                return self._promote(ident, seq)
            if cmd.writes:
                known = epoch <= self.state.epoch
                return protocol.pack_error(seq, NotPrimary(
                    f"shard {self.shard}: copy {self.name} is a replica"
                    + (f" of {self.state.primary}" if known else "; the shard failed over "
                       f"after epoch {self.state.epoch}, which this copy has not seen"),
                    primary=self.state.primary if known else None, epoch=self.state.epoch))
            if cmd is protocol.PING:
                return protocol.pack_reply(seq, 0, self.health())
            if self.store is None:
                raise ShardUnavailable(
                    f"shard {self.shard}: replica {self.name} has no copy yet (taking its "
                    "first snapshot)", hint="read from the primary, or wait for the snapshot")
            args = cmd.validate(self.store.tables, body)
            if cmd is protocol.STATS:
                s = self.store.stats()
                s["shard"] = self.shard
                s["replica"] = self.health()
                return protocol.pack_reply(seq, 0, s)
            if cmd.handle is None:
                raise ProtocolError(f"replicas do not serve command {cmd.name!r}")
            with self.store.read() as r:
                guard = self.slots.guard(r.txn, self.meta_db)
                return protocol.pack_reply(seq, 0, read_guarded(guard, cmd, args, rv, r))
        except Error as exc:
            return protocol.pack_error(seq, exc)
        except Exception as exc:
            log.exception("request failed")
            return protocol.pack_error(seq, InternalError(f"{type(exc).__name__}: {exc}"))

    def health(self) -> dict[str, Any]:
        """PING's answer: the copy's role and how far it is behind, plus an owner's fields."""
        s = self.state
        lag_txns = max(0, self.primary_last - s.applied)
        h: dict[str, Any] = {
            "shard": self.shard, "pid": os.getpid(), "member": self.name, "role": REPLICA,
            "epoch": s.epoch, "primary": s.primary, "applied": s.applied,
            "applied_epoch": s.applied_epoch, "lag_txns": lag_txns,
            "lag_seconds": round(time.time() - self.caught_up_at, 3) if lag_txns else 0.0,
            "state": self.phase, "uptime": time.time() - self.started,
            "applied_txns": self.applied_txns, "snapshots": self.snapshots,
            "last_commit": None, "disk_full": None, "changes": None,
        }
        if self.store is not None:
            h.update(stats.map_health(self.store.env, self.config.max_map_size))
        return h

    # -- finding the primary ---------------------------------------------------------------------

    def _find_primary(self) -> None:
        """Ask every other copy; follow the one that is primary at the highest epoch."""
        others = [m.name for m in self.config.members(self.shard) if m.name != self.name]
        top = primary_of(ping_copies(self.config, self.shard, others))
        if top is None or (top.member == self.state.primary and top.epoch <= self.state.epoch):
            return
        if top.epoch < self.state.epoch:
            log.warning("shard %d: %s says it is primary at epoch %d, below this copy's %d; "
                        "not following it", self.shard, top.member, top.epoch, self.state.epoch)
            return
        log.info("shard %d: %s is primary at epoch %d; following it", self.shard, top.member,
                 top.epoch)
        new = replace(self.state, primary=top.member, epoch=top.epoch)
        if self.store is not None:
            self._write_state(new)
        else:
            self.state = new

    # -- snapshots -------------------------------------------------------------------------------

    def _start_snapshot(self) -> None:
        self._close_feed()
        self.phase = SNAPSHOT
        primary = self.config.member(self.shard, self.state.primary)
        tmp = self.member.dir.with_name(self.member.dir.name + SNAPSHOT_DIR)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("shard %d: taking a snapshot of %s's copy from %s", self.shard, primary.name,
                 primary.backup_endpoint)
        self.snapshot_thread = _SnapshotTaker(self.config, self.shard, primary, tmp)
        self.snapshot_thread.start()

    def _finish_snapshot(self) -> None:
        t = self.snapshot_thread
        assert t is not None
        self.snapshot_thread = None
        try:
            if t.error is not None:
                raise t.error
            assert t.path is not None
            self._install(t.path, t.txn_id, t.primary.name)
        except Exception as exc:
            message = exc.message if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}"
            log.warning("shard %d: snapshot from %s failed: %s; trying again", self.shard,
                        t.primary.name, message)
            self.phase = CONNECTING
            self.retry_at = time.monotonic() + RETRY_DELAY
            self._find_primary()
            return
        finally:
            shutil.rmtree(t.dest, ignore_errors=True)
        self.need_snapshot = False
        self.snapshots += 1
        self.phase = CONNECTING

    def _install(self, path: Path, txn_id: int, primary: str) -> None:
        """Make the snapshot file at ``path`` (the primary's copy at ``txn_id``) this copy."""
        with _open_file(path, readonly=True) as snap, snap.begin() as txn:
            meta = meta_records(snap, txn)
        if meta.get(META_ON) != b"1" or not meta.get(META_HISTORY):
            raise Error(f"shard {self.shard}: {primary} keeps no change log to follow",
                        hint="switch [changes] enabled on for every copy of the shard")
        primary_epoch = read_state(meta, primary).epoch
        state = MemberState(REPLICA, max(self.state.epoch, primary_epoch), primary,
                            meta[META_HISTORY].decode(), txn_id, primary_epoch)
        if self.store is None:
            self._install_first(path, state)
        else:
            self._load_live(path, state)
        self.state = state
        self.primary_last = max(self.primary_last, txn_id)
        self.caught_up_at = time.time()
        log.info("shard %d: copy %s now holds %s's txn %d (history %s, epoch %d)", self.shard,
                 self.name, primary, txn_id, state.replica_history, state.epoch)

    def _install_first(self, path: Path, state: MemberState) -> None:
        """No copy yet: mark the file as this copy's (its own change log starts anew) and
        rename it into place."""
        with _open_file(path, readonly=False) as env:
            txn = env.begin(write=True)
            try:
                meta_db = env.open_db(META_DB, txn=txn)
                with contextlib.suppress(lmdb.NotFoundError):
                    txn.drop(env.open_db(CHANGES_DB, txn=txn, create=False), delete=False)
                for key in _CHANGE_LOG_RECORDS:
                    txn.delete(key, db=meta_db)
                _put_state(txn, meta_db, state)
                txn.commit()
            except BaseException:
                txn.abort()
                raise
            env.sync(True)
        staging = path.parent / "copy"
        staging.mkdir()
        os.rename(path, staging / "data.mdb")
        target = self.member.dir
        if target.exists():  # a directory without data (a lock file left behind)
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
        _fsync_dir(target.parent)
        self._open_store()

    def _load_live(self, path: Path, state: MemberState) -> None:
        """Replace the live copy's contents by the snapshot's in one write transaction:
        readers of the copy see the old state or the new, never a mix."""
        assert self.store is not None
        env = self.store.env
        changes = self.store.changes
        with _open_file(path, readonly=True) as snap, snap.begin() as stxn:
            def load(txn: lmdb.Transaction) -> None:
                main = env.open_db(None, txn=txn)
                for db in list(named_dbs(txn, main)):
                    if db.name not in (CHANGES_DB, META_DB):
                        txn.drop(env.open_db(db.name, txn=txn, **db.open_flags), delete=False)
                smain = snap.open_db(None, txn=stxn)
                for db in list(named_dbs(stxn, smain)):
                    src = snap.open_db(db.name, txn=stxn, create=False, **db.open_flags)
                    if db.name == CHANGES_DB:
                        continue
                    if db.name == META_DB:
                        for k, v in stxn.cursor(db=src).iternext():
                            if bytes(k) not in _CHANGE_LOG_RECORDS:
                                txn.put(k, v, db=self.meta_db)
                        continue
                    dst = env.open_db(db.name, txn=txn, **db.open_flags)
                    txn.cursor(db=dst).putmulti(stxn.cursor(db=src).iternext(), dupdata=True)
                _put_state(txn, self.meta_db, state)
                if changes is not None and changes.enabled:
                    # The copy's own log starts a new history: its watchers start again.
                    txn.drop(changes.db, delete=False)
                    history = os.urandom(8).hex()
                    floor = txn.id() + 1
                    txn.put(META_HISTORY, history.encode(), db=self.meta_db)
                    txn.put(META_FLOOR, str(floor).encode(), db=self.meta_db)
                    txn.put(META_ON, b"1", db=self.meta_db)
                    changes.history, changes.floor = history, floor

            self._write(load)

    # -- following -------------------------------------------------------------------------------

    def _subscribe(self) -> None:
        """Follow the primary's log from the first transaction not applied, on a new
        connection (what the old one had in flight is dropped with it)."""
        self._close_feed()
        primary = self.config.member(self.shard, self.state.primary)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, self.config, primary.changes_endpoint)
        sock.connect(primary.changes_endpoint)
        self.feed = sock
        self.wid = self.wid % 2_000_000_000 + 1
        self.seq = 0
        self.received = 0
        self.heard = time.monotonic()
        self.phase = CONNECTING
        sock.send(self._follow_frame(self.state.applied + 1))

    def _follow_frame(self, txn: int) -> bytes:
        """The message that starts following the primary's log at ``txn``."""
        s = self.state
        return pack(REPLICATE, self.wid, self.name, s.replica_history, txn, CREDIT_WINDOW)

    def _close_feed(self) -> None:
        if self.feed is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.feed.send(pack(CANCEL, self.wid), zmq.NOBLOCK)
            self.feed.close(linger=0)
            self.feed = None

    def _retry_later(self) -> None:
        self._close_feed()
        self.retry_at = time.monotonic() + RETRY_DELAY

    def _resnapshot(self, why: str) -> None:
        log.warning("shard %d: %s; taking a new snapshot", self.shard, why)
        self._close_feed()
        self.need_snapshot = True

    def _drain_feed(self) -> None:
        sock = self.feed
        assert sock is not None
        for _ in range(CREDIT_WINDOW * 2):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(frames, "owner", limit=None)
            except ProtocolError:
                continue
            if msg.message is ERROR and msg.watch_id == 0:
                code, message, _hint = msg.values
                log.error("shard %d: %s refused a frame of this replica: %s (error %d)",
                          self.shard, self.state.primary, message, code)
                self._retry_later()
                return
            if msg.watch_id != self.wid:
                continue
            self.heard = time.monotonic()
            try:
                self._handle(msg.message, msg.values, msg.data)
            except ReplicaDiverged as exc:
                self._resnapshot(exc.message)
            if self.feed is not sock:
                return  # subscribed anew, or snapshotting
        if self.received >= CREDIT_WINDOW // 2:
            sock.send(pack(CREDIT, self.wid, self.received))
            self.received = 0

    def _handle(self, m: Any, values: list[Any], data: bytes | None) -> None:
        if m is STARTED:
            if values[0] != self.state.replica_history:
                self._resnapshot(f"{self.state.primary}'s log is history {values[0]}, this "
                                 f"copy follows {self.state.replica_history}")
            else:
                self.phase = FOLLOWING
        elif m is COMPACTED:
            self._resnapshot(f"{self.state.primary}'s log no longer holds txn "
                             f"{self.state.applied + 1}: {values[2]}")
        elif m is ERROR:
            self._feed_error(*values)
        else:
            self._take(m, values, data)

    def _feed_error(self, code: int, message: str, hint: str | None) -> None:
        if code in (ChangesCompacted.code, InvalidCursor.code):
            self._resnapshot(f"{self.state.primary} cannot serve its log from txn "
                             f"{self.state.applied + 1}: {message}")
        else:
            log.warning("shard %d: %s ended the feed: %s (error %d); subscribing again",
                        self.shard, self.state.primary, message, code)
            self._retry_later()

    def _take(self, m: Any, values: list[Any], data: bytes | None) -> None:
        """A CHANGES or PROGRESS message: apply it, or subscribe again after a gap."""
        seq = values[0]
        self.received += 1
        if seq != self.seq + 1:
            log.warning("shard %d: message %d of the feed came after %d; subscribing again",
                        self.shard, seq, self.seq)
            self._subscribe()
            return
        self.seq = seq
        if m is CHANGES:
            txn_id, indexes = values[1], values[2]
            self.primary_last = max(self.primary_last, txn_id)
            if indexes is not None:
                raise ReplicaDiverged(f"{self.state.primary} sent part of txn {txn_id}")
            if txn_id > self.state.applied:
                assert data is not None
                self._apply(txn_id, msgpack.unpackb(data, raw=False, use_list=True))
        elif m is PROGRESS:
            before = values[1] - 1
            self.primary_last = max(self.primary_last, before)
            if before > self.state.applied:
                self._mark_applied(before)
        if self.state.applied >= self.primary_last:
            self.caught_up_at = time.time()

    def _apply(self, txn_id: int, effects: list[Any]) -> None:
        """Apply primary transaction ``txn_id`` in one local write transaction."""
        assert self.store is not None
        tables = self.store.tables
        changes = self.store.changes
        state = replace(self.state, applied=txn_id, applied_epoch=self.state.epoch)

        def apply(txn: lmdb.Transaction) -> None:
            w = WriteTxn(txn, tables)
            for e in effects:
                self._apply_effect(txn, w, txn_id, e)
            if changes is not None and changes.enabled:
                changes.append(txn, txn.id(), effects)
            txn.put(META_REPLICA_APPLIED, str(txn_id).encode(), db=self.meta_db)
            txn.put(META_REPLICA_APPLIED_EPOCH, str(state.applied_epoch).encode(),
                    db=self.meta_db)

        try:
            self._write(apply)
        except ReplicaDiverged:
            raise
        except Error as exc:
            raise ReplicaDiverged(f"txn {txn_id} of {self.state.primary} does not apply to "
                                  f"this copy: {exc.message}") from exc
        self.state = state
        self.applied_txns += 1
        self._tell_applied(txn_id)

    def _apply_effect(self, txn: lmdb.Transaction, w: WriteTxn, txn_id: int,
                      e: list[Any]) -> None:
        """Apply one effect of primary transaction ``txn_id``: a row's put or delete (a row a
        re-shard moved has a 4th field), a client record, or the shard's new slot state."""
        tid, key, value = e[0], e[1], e[2]
        if tid == CLIENTS_TABLE_ID:
            if value is None:
                txn.delete(key, db=self.clients_db)
            else:
                txn.put(key, value, db=self.clients_db)
            return
        if tid == SLOTS_TABLE_ID:  # the shard's new slot state, or the marker of moved rows
            if value is not None:
                slots = SlotState.from_wire(msgpack.unpackb(value, raw=False))
                for mk, mv in slots.records().items():
                    txn.put(mk, mv, db=self.meta_db)
            return
        b = w.tables.by_tid.get(tid)
        if b is None:
            raise ReplicaDiverged(f"txn {txn_id} of {self.state.primary} changes a "
                                  f"table this schema does not know ({tid.hex()})")
        if value is None:
            w.delete_raw(b, key)
        else:
            w.put_raw(b, key, value)

    def _mark_applied(self, txn_id: int) -> None:
        """Every transaction of the primary up to ``txn_id`` is applied (those after the last
        applied changed nothing this copy keeps)."""
        state = replace(self.state, applied=txn_id, applied_epoch=self.state.epoch)
        self._write(lambda txn: _put_state(txn, self.meta_db, state))
        self.state = state
        self._tell_applied(txn_id)

    def _tell_applied(self, txn_id: int) -> None:
        if self.feed is not None:
            self.feed.send(pack(APPLIED, self.wid, txn_id))

    # -- promotion -------------------------------------------------------------------------------

    def _promote(self, ident: bytes, seq: int) -> bytes | None:
        """PROMOTE: become the shard's owner at an epoch above every copy's; answer once the
        owner serves (on this same socket)."""
        if self.store is None or self.snapshot_thread is not None or self.need_snapshot:
            raise ShardUnavailable(
                f"shard {self.shard}: replica {self.name} is taking a snapshot and holds no "
                "complete copy; it cannot take over now", hint="wait until it follows "
                "(lmshard status), or fail over to another replica")
        self.phase = PROMOTING
        self._close_feed()
        others = [m.name for m in self.config.members(self.shard) if m.name != self.name]
        answers = ping_copies(self.config, self.shard, others)
        epoch = max([self.state.epoch, *(a.epoch for a in answers.values())]) + 1
        lag = max(0, self.primary_last - self.state.applied)
        applied, old = self.state.applied, self.state.primary
        self._write_state(replace(self.state, role=PRIMARY, primary=self.name, epoch=epoch))
        log.info("shard %d: %s promoted to primary at epoch %d (it applied %s's txn %d; %d "
                 "more it knew of were not applied)", self.shard, self.name, epoch, old,
                 applied, lag)
        assert self.store is not None
        self.store.close()
        self.store = None
        try:
            owner = ShardOwner(self.config, self.shard, self.schema, member=self.name)
            owner.load_channels()
        except Error as exc:
            log.error("shard %d: %s cannot serve as owner: %s", self.shard, self.name, exc)
            self.stopping = True
            return protocol.pack_error(seq, exc)
        owner.sock = self.sock
        self.sock = None
        self.owner = owner
        reply = protocol.pack_reply(seq, 0, {"member": self.name, "epoch": epoch,
                                             "applied": applied, "lag_txns": lag})
        assert owner.sock is not None
        owner.sock.send_multipart([ident, reply])
        return None

    def close(self) -> None:
        self._close_feed()
        t = self.snapshot_thread
        if t is not None:
            t.join(timeout=5)
            shutil.rmtree(t.dest, ignore_errors=True)
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
            endpoint = self.member.endpoint
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint[6:])
        if self.store is not None:
            self.store.close()
            self.store = None


class _SnapshotTaker(threading.Thread):
    """Receives a snapshot of ``primary``'s copy into ``dest`` while the loop answers."""

    def __init__(self, config: Config, shard: int, primary: Member, dest: Path) -> None:
        super().__init__(name=f"snapshot-{shard}", daemon=True)
        self.config = config
        self.shard = shard
        self.primary = primary
        self.dest = dest
        self.path: Path | None = None
        self.txn_id = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        # The backup coordinator's receiving side, loaded only by a replica that takes a
        # snapshot (the daemon's processes do not load the operator tooling otherwise).
        from lmshard.ops.backup.coordinator import take_shard_snapshot

        try:
            self.path, self.txn_id = take_shard_snapshot(
                self.config, self.shard, self.dest, endpoint=self.primary.backup_endpoint)
        except BaseException as exc:  # reported by the loop
            self.error = exc


@contextlib.contextmanager
def _open_file(path: Path, *, readonly: bool) -> Any:
    env = lmdb.open(str(path), subdir=False, readonly=readonly, lock=False, max_dbs=MAX_DBS,
                    map_size=max(path.stat().st_size * 2, 2**20))
    try:
        yield env
    finally:
        env.close()


def _put_state(txn: lmdb.Transaction, meta_db: Any, state: MemberState) -> None:
    for key, value in state_records(state).items():
        txn.put(key, value, db=meta_db)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- entry points ------------------------------------------------------------------------------


def run_copy(config: Config, shard: int, name: str) -> int:
    """Entry point of ``lmshardd owner`` (the home copy) and ``lmshardd replica``: decide this
    copy's role (``decide_start``), then serve as owner or follow as replica; the exit
    status."""
    decision = decide_start(config, shard, name)
    log.info("shard %d: copy %s starts as %s: %s", shard, name,
             "owner" if decision.owner else f"replica of {decision.state.primary}",
             decision.reason)
    if decision.owner:
        return run_owner(config, shard, name)
    try:
        replica = Replica(config, shard, name, decision.state)
    except Error as exc:
        log.error("shard %d: replica %s cannot start: %s", shard, name, exc)
        return 2
    replica.install_signal_handlers()
    try:
        replica.bind()
    except Error as exc:
        log.error("shard %d: replica %s cannot serve: %s", shard, name, exc)
        replica.close()
        return 2
    replica.serve_forever()
    owner = replica.owner
    if owner is None:
        return 0
    owner.install_signal_handlers()
    replica.stopping = False
    return serve(owner)
