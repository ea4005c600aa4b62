"""The shard owner: the one process that writes a shard's LMDB environment.

It binds a ROUTER socket and loops: drain every request waiting, apply all write batches in one
LMDB write transaction (group commit), each batch in a nested transaction so a failing batch
fails alone, commit, then answer each batch with its outcome and the txn id it committed in.
The last applied sequence number per client, with its reply, is written in the same transaction,
so a retried batch is answered again but applied once.

With replicas (``replica.names``) each commit's change-log record also carries the client
records it wrote, so a copy that takes over answers a resent batch as this owner would; with
``durability.replicas = k`` the successful replies wait for k replicas (``lmshardd.replication``).
Every successful write reply carries the shard's epoch; a request from a later epoch means the
shard was failed over: the owner answers it ``NotPrimary``, accepts no more writes and exits
with status ``FENCED_EXIT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

import lmdb
import msgpack
import zmq

from lmshard import protocol, security, stats_wire
from lmshard.changes import CLIENTS_TABLE_ID, MOVED, SLOTS_TABLE_ID, ChangeLog, record_time
from lmshard.config import Config
from lmshard.errors import (
    Error,
    InternalError,
    NotPrimary,
    OutOfOrder,
    ProtocolError,
    StoreFull,
)
from lmshard.map_growth import begin_read
from lmshard.members import HOME, META_ROLE, Member, MemberState, read_state, state_records
from lmshard.shard_identity import check_shard_identity, identity_records
from lmshard.slot_state import SlotState, check_slot_state
from lmshard.store import Store, grow_map
from lmshard.store_meta import META_DB
from lmshard.txn import ReadTxn, WriteTxn
from lmshardd import flushing, stats
from lmshardd.changes import ChangesChannel
from lmshardd.channels import CHANNEL_FACTORIES, Channel
from lmshardd.grouping import ActiveWriters, wait_readable
from lmshardd.hangup import report_hangup
from lmshardd.owner_state import DiskFullWatch, OwnerCounters
from lmshardd.replication import Replication, not_primary
from lmshardd.slot_guard import MOVE_ROWS_VERSION, SlotGuard, check_new_state, read_guarded
from lmshardd.unix_peers import UnixPeer, UnixServer, make_server

log = logging.getLogger("lmshardd.owner")

Peer = bytes | UnixPeer
"""Who sent a request and gets its reply: a ROUTER peer's identity, or a client connection on
the owner's unix socket (``lmshardd.unix_peers``)."""
WriteBatches = list[tuple[Peer, bytes | None, int, list[protocol.Op], int]]
"""Write batches drained for one group commit: (peer, client id, seq, checked ops, the slot
map version the request was routed by; ``MOVE_ROWS_VERSION`` for ``move_rows``)."""
Others = list[tuple[Peer, int, protocol.Command, Any, int]]
"""Requests drained beside the writes: (peer, seq, command, checked body, map version)."""
Outcome = tuple[int, Any]
"""A batch's reply before it is packed: (status, body)."""
Replies = list[tuple[Peer, bytes, int]]
"""A group's replies: (peer, reply frame, the txn id a successful write reply waits for
replicas to apply, or 0 for an error)."""

MAX_GROUP = 1024
"""Most requests drained into one group commit."""
POLL_MS = 100
"""How long the loop waits for requests before it looks at signals and housekeeping."""
READER_CHECK_INTERVAL = 1.0
"""Seconds between reader_check() calls, which free slots of crashed reader processes."""
CLIENTS_DB = b"__clients__"
GROUP_LINGER_THRESHOLD = 1.2
"""Average batches per commit above which the owner waits briefly for more writers."""
GROUP_LINGER_FRACTION = 0.3
"""The longest wait, as a fraction of the average commit time."""
GROUP_LINGER_MAX = 0.001
"""Never wait longer than 1 ms for a group to fill."""
ACTIVE_WRITER_WINDOW = 0.1
"""Seconds a client counts as an active writer after its last batch; the owner stops waiting
for a group to fill once it holds a batch from each."""
EPOCH_FIELD = 5
"""Where a client record keeps the epoch of its reply: [seq, status, reply, older replies, time,
epoch]."""
FENCED_EXIT = 3
"""``lmshardd owner``'s exit status after a request from a later epoch fenced it."""
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
STALE_READ_TRIES = 50
"""Most new reads a read command tries for one that sees the owner's last commit."""


class ShardOwner:
    """Owns shard ``shard`` of ``config``: opens its environment and serves its socket."""

    def __init__(self, config: Config, shard: int, schema: Any = None, *,
                 member: str = HOME) -> None:
        if not 0 <= shard < config.shards:
            raise ValueError(f"shard {shard} is not in 0..{config.shards - 1}")
        self.config = config
        self.shard = shard
        self.member: Member = config.member(shard, member)
        """The copy of the shard this owner serves: its home, or a replica promoted to owner."""
        self.schema = schema if schema is not None else config.load_schema()
        self.schema.check_sharded(config.shards)
        self.path = self.member.dir
        self.state: MemberState = read_state({}, member)
        """This copy's role and epoch (``lmshard.members``), read from meta when it opens."""
        self.guard = SlotGuard(shard, SlotState(config.slot_map_version, config.slot_map))
        """The shard's slot state and what it means for requests (``lmshardd.slot_guard``),
        read from meta when it opens and replaced by each ``slot_state`` it records."""
        self.store = Store(
            self.path,
            self.schema,
            map_size=config.map_size,
            max_map_size=config.max_map_size,
            sync=flushing.sync_each_commit(config),
            metasync=config.metasync,
            max_readers=config.max_readers,
            on_open=self._check_identity,
            changes=config.changes_enabled,
            changes_retain=config.changes_retain,
            changes_retain_seconds=config.changes_retain_seconds,
        )
        log_ = self.store.changes
        self.changes: ChangeLog | None = log_ if log_ is not None and log_.enabled else None
        self.env = self.store.env
        self.tables = self.store.tables
        self.clients_db = self.env.open_db(CLIENTS_DB)
        self.meta_db = self.env.open_db(META_DB, create=False)
        self.counters = OwnerCounters(last_txn_id=self.env.info()["last_txnid"])
        self.stopping = False
        self.hangup = False
        self.paused = False
        self.hurry = False  # a channel has more to do: the next poll does not wait
        self._group_avg = 1.0
        self._commit_avg = 0.0
        self._writers = ActiveWriters(ACTIVE_WRITER_WINDOW)
        self.disk_full = DiskFullWatch(str(self.path), shard)
        self._moved_logged = False  # the record being built holds the moved rows' marker
        self._alone = False  # the group being committed has one batch: no nested txn
        self.fenced = False
        """A request from a later epoch came: this owner accepts no more writes and stops."""
        self._fenced_by = 0
        self.log_clients = bool(config.replica_names) and self.changes is not None
        """Client records go into the change log (for replicas), beside the batches' effects."""
        self.replication: Replication | None = None
        if config.replica_names:
            self.replication = Replication(shard, config.replicas_required,
                                           config.replica_timeout, self._send_reply)
            if self.changes is None:
                log.error("shard %d: replica.names is set but the change log is off ([changes] "
                          "enabled = false): replicas cannot follow this shard", shard)
        self.holding = self.replication is not None and config.replicas_required > 0
        """Successful write replies wait for durability.replicas replicas."""
        flusher = flushing.make_channel(self)
        self.channels: list[Channel] = [] if flusher is None else [flusher]
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock: zmq.Socket[bytes] | None = None
        self.unix: UnixServer | None = None
        """The unix socket same-host clients send one-at-a-time requests to (while serving,
        with ``shard.unix_socket`` and an ipc endpoint)."""
        self._unpack = msgpack.Unpacker  # keeps the import honest for type checkers

    def _check_identity(
        self, txn: lmdb.Transaction, meta_db: Any, meta: dict[bytes, bytes]
    ) -> None:
        """Refuse to serve a shard directory that belongs to another shard or slot map."""
        check_shard_identity(self.config, self.shard, self.schema, meta, self.path)
        self.guard = SlotGuard(self.shard, check_slot_state(self.config, meta, self.path))
        for key, value in identity_records(self.config, self.shard, meta).items():
            txn.put(key, value, db=meta_db)
        self.state = read_state(meta, self.member.name)
        if META_ROLE not in meta:  # a new copy: its defaults, recorded
            for key, value in state_records(self.state).items():
                txn.put(key, value, db=meta_db)

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def slots(self) -> SlotState:
        """The slot state this owner serves by (``lmshard.slot_state``)."""
        return self.guard.state

    # -- serving -----------------------------------------------------------------------------

    def bind(self) -> None:
        self.sock = request_socket(self.ctx, self.config, self.member.endpoint)
        log.info("shard %d serving %s on %s (pid %d)", self.shard, self.path,
                 self.member.endpoint, os.getpid())

    def add_channel(self, channel: Channel) -> None:
        self.channels.append(channel)

    def load_channels(self) -> None:
        """Add the channel of each of CHANNEL_FACTORIES that is on."""
        for make_channel in CHANNEL_FACTORIES:
            channel = make_channel(self)
            if channel is not None:
                self.add_channel(channel)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping = True

        def hangup(signum: int, frame: Any) -> None:
            self.hangup = True  # the loop re-reads the config between requests

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hangup)

    def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT; the commit in progress finishes and is answered. On
        SIGHUP, re-read the config file and report what changed (see ``report_hangup``)."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        sock = self.sock
        poller, paused_poller, extra = self._pollers(sock)
        self.unix = unix = make_server(self.config, self.member.endpoint, poller)
        next_check = time.monotonic() + READER_CHECK_INTERVAL
        while not self.stopping:
            # Frames read from unix clients and not served yet (a group was full): no wait.
            pending = unix is not None and bool(unix.frames) and not self.paused
            wait = 0 if self.hurry or pending else POLL_MS
            self.hurry = False
            ready = dict((paused_poller if self.paused else poller).poll(wait))
            if extra:
                for csock, ch in extra.items():
                    if csock in ready:
                        ch.on_readable(csock)
            if not self.paused:
                if unix is not None:
                    unix.on_ready(ready)
                if sock in ready or (unix is not None and unix.frames):
                    self.serve_once(sock, sock in ready)
            next_check = self._between_turns(time.monotonic(), next_check)
        log.info("shard %d stopping: last txn %d", self.shard, self.counters.last_txn_id)
        self.close()

    def _pollers(self, sock: zmq.Socket[bytes]
                 ) -> tuple[zmq.Poller, zmq.Poller, dict[Any, Channel]]:
        """The loop's poller (the request socket and the channels' sockets), the one it polls
        while paused (the channels' alone: waiting writes must not wake the loop), and which
        channel each channel socket is."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        paused_poller = zmq.Poller()
        extra: dict[Any, Channel] = {}
        for ch in self.channels:
            for csock in ch.sockets():
                poller.register(csock, zmq.POLLIN)
                paused_poller.register(csock, zmq.POLLIN)
                extra[csock] = ch
        return poller, paused_poller, extra

    def _between_turns(self, now: float, next_check: float) -> float:
        """After each turn of the loop: the channels' ticks, a SIGHUP report, and every
        READER_CHECK_INTERVAL a reader_check(); when the next check is due."""
        for ch in self.channels:
            ch.tick(now)
        if self.holding and self.replication is not None and self.replication.held:
            self.replication.tick(now)
        if self.hangup:
            self.hangup = False
            report_hangup(self.config, f"shard_{self.shard:02d}", log)
        if now < next_check:
            return next_check
        stale = self.env.reader_check()
        if stale:
            log.info("freed %d reader slots of dead processes", stale)
        return now + READER_CHECK_INTERVAL

    def serve_once(self, sock: zmq.Socket[bytes], router: bool = True) -> int:
        """Drain waiting requests (the ROUTER's unless ``router`` is False, and those read from
        the unix socket's clients), group-commit the writes, answer everything. Returns
        count."""
        writes: WriteBatches = []
        others: Others = []
        n = self._drain(sock, writes, others, MAX_GROUP) if router else 0
        unix = self.unix
        if unix is not None and unix.frames:
            n += self._take_unix(sock, unix, writes, others, MAX_GROUP - n)
        if writes:
            now = time.monotonic()
            self._writers.note(writes, now)
            expected = self._writers.count(now)
            if len(writes) < expected and self._group_avg > GROUP_LINGER_THRESHOLD:
                n = self._linger(sock, writes, others, n, now, expected)
            self._commit_and_answer(sock, writes)
        for ident, seq, cmd, args, rv in others:
            if cmd is protocol.SLOT_STATE and args is not None:
                self._record_slot_state(sock, ident, seq, args)
                continue
            self._send(sock, ident, self.answer(seq, cmd, args, rv))
        return n

    def _linger(self, sock: zmq.Socket[bytes], writes: WriteBatches, others: Others, n: int,
                now: float, expected: int) -> int:
        """Other writers are active: a moment's wait lets their next batches join this commit,
        so one fsync serves them all. It ends once each active writer is in; the count of
        requests drained."""
        unix = self.unix
        deadline = now + min(GROUP_LINGER_MAX, self._commit_avg * GROUP_LINGER_FRACTION)
        while len(writes) < expected and n < MAX_GROUP:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not wait_readable(sock, left, unix if unix is not None and unix.peers else None):
                break
            n += self._drain(sock, writes, others, MAX_GROUP - n)
            if unix is not None and unix.frames:
                n += self._take_unix(sock, unix, writes, others, MAX_GROUP - n)
        self._writers.note(writes, now)
        return n

    def _send(self, sock: zmq.Socket[bytes], peer: Peer, frame: bytes) -> None:
        """Send reply ``frame`` to ``peer``: a ROUTER identity, or a unix-socket client."""
        if type(peer) is bytes:
            sock.send(peer, _SNDMORE)
            sock.send(frame)
        else:
            peer.send(frame)  # type: ignore[union-attr]

    def _commit_and_answer(self, sock: zmq.Socket[bytes], writes: WriteBatches) -> None:
        """Group-commit ``writes`` and send (or, for replicas, hold) the replies. An owner that
        a request fenced while they were drained commits none of them."""
        if self.fenced:
            self._refuse_fenced(sock, writes)
            return
        self._group_avg += (len(writes) - self._group_avg) * 0.2
        started = time.perf_counter()
        replies = self.commit_group(writes)
        self._commit_avg += (time.perf_counter() - started - self._commit_avg) * 0.2
        if self.holding:
            assert self.replication is not None
            self.replication.answer(replies, [w[2] for w in writes], time.monotonic())
            return
        for ident, reply, _txn in replies:
            self._send(sock, ident, reply)

    def _drain(
        self, sock: zmq.Socket[bytes], writes: WriteBatches,
        others: Others, limit: int,
    ) -> int:
        """Take every request waiting on the socket (up to ``limit``); answer bad ones at once."""
        n = 0
        while n < limit:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            n += 1
            if len(frames) == 2:
                self._take(sock, frames[0], frames[1], writes, others)
            else:
                self.counters.bad_frames += 1
                if len(frames) == 1:  # the identity alone
                    self._take(sock, frames[0], frames[0], writes, others)
            if not int(sock.getsockopt(_EVENTS)) & _POLLIN:  # (cheaper than the next zmq.Again)
                break
        return n

    def _take_unix(self, sock: zmq.Socket[bytes], unix: UnixServer, writes: WriteBatches,
                   others: Others, limit: int) -> int:
        """Take the requests read from the unix socket's clients (up to ``limit``)."""
        frames = unix.frames
        taken = frames[:limit]
        del frames[:limit]
        for peer, frame in taken:
            self._take(sock, peer, frame, writes, others)
        return len(taken)

    def _take(self, sock: zmq.Socket[bytes], peer: Peer, frame: bytes, writes: WriteBatches,
              others: Others) -> None:
        """Decode and check one request: a write joins ``writes``, anything else ``others``;
        a bad one, or any request once fenced, is answered at once."""
        seq = 0
        try:
            code, client_id, seq, body, epoch, map_version = protocol.unpack_request(frame)
            if epoch > self.state.epoch or self.fenced:
                self._send(sock, peer, protocol.pack_error(seq, self._fence(epoch)))
                return
            cmd = protocol.BY_CODE.get(code)
            if cmd is None:
                raise ProtocolError(f"unknown command code {code}")
            args = cmd.validate(self.tables, body)
        except Error as exc:
            self.counters.bad_frames += 1
            self._send(sock, peer, protocol.pack_error(seq, exc))
            return
        except Exception as exc:  # validation must never take the owner down
            self.counters.bad_frames += 1
            err = ProtocolError(f"invalid request: {type(exc).__name__}: {exc}")
            self._send(sock, peer, protocol.pack_error(seq, err))
            return
        if cmd.writes:
            rv = MOVE_ROWS_VERSION if cmd is protocol.MOVE_ROWS else map_version
            writes.append((peer, client_id, seq, args, rv))
        else:
            others.append((peer, seq, cmd, args, map_version))

    def _fence(self, epoch: int) -> NotPrimary:
        """A request from ``epoch`` (or any request once fenced): the first one above this
        owner's epoch fences it (no more writes, held acks refused, the loop stops); the
        answer for the request."""
        if not self.fenced and epoch > self.state.epoch:
            self.fenced = True
            self.stopping = True
            self._fenced_by = epoch
            log.error("shard %d: a request from epoch %d came to this owner at epoch %d: the "
                      "shard was failed over to another copy; accepting no more writes and "
                      "stopping (exit status %d)", self.shard, epoch, self.state.epoch,
                      FENCED_EXIT)
            if self.replication is not None:
                self.replication.refuse_held(
                    not_primary(self.shard, self.state.epoch, epoch))
        return not_primary(self.shard, self.state.epoch, max(epoch, self._fenced_by))

    def _refuse_fenced(self, sock: zmq.Socket[bytes], writes: WriteBatches) -> None:
        """Answer write batches drained before the request that fenced the owner: none of
        them is applied."""
        err = self._fence(0)
        for ident, _cid, seq, _ops, _rv in writes:
            self._send(sock, ident, protocol.pack_error(seq, err))

    def _send_reply(self, ident: Peer, frame: bytes) -> None:
        """Send a reply released later (held for replicas) to its peer."""
        if self.sock is not None:
            self._send(self.sock, ident, frame)

    def commit_group(self, batches: WriteBatches) -> Replies:
        """Apply every batch in one write transaction; the replies to send after commit."""
        started = time.perf_counter()
        self._alone = len(batches) == 1
        while True:
            txn = self.env.begin(write=True)
            try:
                effects: list[Any] | None = [] if self.changes is not None else None
                outcomes = self._apply_all(txn, batches, effects)
                txn_id = txn.id()
                if effects and self.changes is not None:
                    self.changes.append(txn, txn_id, effects)
                txn.commit()
                break
            except _Failed:  # the one batch failed in the group's own txn: again, nested
                txn.abort()
                self._alone = False
            except lmdb.MapFullError:
                txn.abort()
                try:
                    grow_map(self.env, self.config.max_map_size, str(self.path))
                except StoreFull as full:
                    # Past the cap: no batch of this group is applied; each gets the error.
                    return self._refuse_group(batches, full)
            except lmdb.Error as exc:
                txn.abort()
                return self._refuse_for_disk(batches, exc)  # re-raises any other error
            except BaseException:
                txn.abort()
                raise
        self._count_commit(batches, txn_id, time.perf_counter() - started)
        return self._replies(batches, outcomes, txn_id)

    def _replies(self, batches: WriteBatches, outcomes: list[Outcome], txn_id: int) -> Replies:
        """The replies to a group committed in ``txn_id``: a successful one carries the txn id
        and the epoch."""
        return [self._reply(ident, seq, status, body, txn_id)
                for (ident, _cid, seq, _ops, _rv), (status, body)
                in zip(batches, outcomes, strict=True)]

    def _reply(self, ident: Peer, seq: int, status: int, body: Any, txn_id: int
               ) -> tuple[Peer, bytes, int]:
        """One batch's reply: an error as it is; a success with its txn id (``txn_id`` when
        it was applied long ago: at the latest in that commit) and the epoch it carries (this
        owner's when its kept reply has none), and that txn id to wait for replicas on."""
        if status:
            return ident, protocol.pack_reply(seq, status, body), 0
        txn = txn_id if body[0] is None else body[0]
        epoch = body[2] if len(body) > 2 else self.state.epoch
        return ident, protocol.pack_reply(seq, 0, [txn, body[1], epoch]), txn

    def _count_commit(self, batches: WriteBatches, txn_id: int, seconds: float) -> None:
        """Count a commit and tell the channels; end a full disk's spell."""
        self.disk_full.ended()
        c = self.counters
        c.commits += 1
        c.last_txn_id = txn_id
        c.last_commit_time = time.time()
        c.commit_seconds.append(seconds)
        c.group_sizes.append(len(batches))
        if self.replication is not None:
            self.replication.committed(txn_id, c.last_commit_time)
        if self.channels:
            n = len(batches)
            ops = len(batches[0][3]) if n == 1 else sum(len(b[3]) for b in batches)
            for ch in self.channels:
                ch.after_commit(n, ops, seconds)
        if len(c.commit_seconds) > 4096:
            del c.commit_seconds[:2048], c.group_sizes[:2048]

    def _refuse_group(self, batches: WriteBatches, err: Error) -> Replies:
        """The replies to a group that was not committed: each batch gets ``err``, but a
        resent batch that an earlier commit applied gets its kept reply (an error would say
        it was not applied)."""
        replies: Replies = []
        with self.env.begin() as txn:
            for ident, cid, seq, _ops, _rv in batches:
                rec = None if cid is None else txn.get(cid, db=self.clients_db)
                if rec is not None:
                    last_seq, status, body, *more = msgpack.unpackb(rec, raw=False)
                    if seq <= last_seq:
                        status, body = _replay(seq, last_seq, status, body, more)
                        replies.append(self._reply(ident, seq, status, body, txn.id()))
                        continue
                self.counters.failed_batches += 1
                replies.append((ident, protocol.pack_error(seq, err), 0))
        return replies

    def _refuse_for_disk(self, batches: WriteBatches, exc: lmdb.Error) -> Replies:
        """Refuse a group whose commit failed for a full disk (raise ``exc`` if it failed for
        another reason). The disk fills while LMDB writes or syncs the transaction's pages,
        before the meta page that would make them visible: nothing of the group is, the
        environment stays usable, and the next group's commit succeeds once there is room."""
        full = self.disk_full.refused(exc, len(batches))
        if full is None:
            raise exc
        return self._refuse_group(batches, full)

    def _apply_all(self, txn: lmdb.Transaction, batches: WriteBatches,
                   effects: list[Any] | None) -> list[Outcome]:
        """Each batch in its own nested transaction, its client record beside it; what the
        applied batches changed is appended to ``effects`` (unless None) for the change log.
        A batch is checked against the shard's slot state after its client record (a batch
        applied before a move is answered as it was), and refused without one."""
        outcomes: list[Outcome] = []
        txn_id = txn.id()
        now = int(time.time())
        log_clients = self.log_clients and effects is not None
        epoch = self.state.epoch
        floor = self.guard.floor
        self._moved_logged = False
        for _ident, cid, seq, ops, rv in batches:
            after = ops.after if type(ops) is protocol.OrderedOps else None
            refused, window = self._admit(txn, cid, seq, after)
            if refused is not None:
                outcomes.append(refused)
                continue
            if rv < floor:  # a re-shard concerns this shard or the request's map is older
                outcome, keep = self._apply_checked(txn, txn_id, cid, ops, rv, effects)
                if not keep:
                    outcomes.append(outcome)
                    continue
            else:
                outcome = self._apply_batch(txn, txn_id, cid, ops, effects)
            if cid is not None:  # [seq, status, reply, older replies of a stream, when, epoch]
                kept = [seq, outcome[0], protocol.stored_reply(*outcome), window, now, epoch]
                packed = msgpack.packb(kept, use_bin_type=True)
                txn.put(cid, packed, db=self.clients_db)
                if log_clients:  # after the batch's own effects; assert for the type checker
                    assert effects is not None
                    effects.append([CLIENTS_TABLE_ID, cid, packed])
            outcomes.append(outcome)
        return outcomes

    def _apply_checked(self, txn: lmdb.Transaction, txn_id: int, cid: bytes | None,
                       ops: list[protocol.Op], rv: int, effects: list[Any] | None
                       ) -> tuple[Outcome, bool]:
        """Batch ``ops``, routed by map version ``rv``, checked against the slot state first
        (``SlotGuard.refusal``): (its outcome, whether it keeps a client record; a batch the
        slots refuse keeps none, so it is refused again if sent again). A ``move_rows`` batch
        is logged as moved rows, with one ``[SLOTS_TABLE_ID, b"moved", nil]`` per record."""
        err = self.guard.refusal(ops, rv)
        if err is not None:
            self.counters.failed_batches += 1
            return _refusal(err), False
        if rv != MOVE_ROWS_VERSION:
            return self._apply_batch(txn, txn_id, cid, ops, effects), True
        moved: list[Any] | None = None if effects is None else []
        outcome = self._apply_batch(txn, txn_id, cid, ops, moved)
        if moved and effects is not None:
            if not self._moved_logged:  # what tells watchers' feeds to look at the record
                self._moved_logged = True
                effects.append([SLOTS_TABLE_ID, b"moved", None])
            effects.extend([tid, kb, vb, MOVED] for tid, kb, vb in moved)
        return outcome, True

    def _admit(self, txn: lmdb.Transaction, cid: bytes | None, seq: int, after: int | None
               ) -> tuple[Outcome | None, list[Any]]:
        """Whether batch ``seq`` of client ``cid`` is applied now: (None, the replies a stream
        keeps for its earlier batches), or (the reply it gets instead, ...): a retried batch
        its kept reply, a pipelined batch that does not follow the last one applied
        OutOfOrder."""
        window: list[Any] = []
        if cid is None:
            if after is None:
                return None, window
            return _refusal(ProtocolError("a pipelined write needs a client id")), window
        rec = txn.get(cid, db=self.clients_db)
        last_seq = 0
        if rec is not None:
            last_seq, status, body, *more = msgpack.unpackb(rec, raw=False)
            if seq <= last_seq:
                self.counters.duplicate_batches += 1
                return _replay(seq, last_seq, status, body, more), window
            if after is not None:  # the replies a resent pipelined batch may need
                window = [[last_seq, status, body], *_older_replies(more)]
                del window[protocol.PIPELINE_WINDOW - 1:]
        if after is not None and (after != last_seq or seq <= after):
            self.counters.out_of_order += 1
            return _refusal(OutOfOrder(
                f"batch {seq} follows batch {after}, but the last batch applied from "
                f"this client is {last_seq}; nothing of batch {seq} was applied")), window
        return None, window

    def _apply_batch(self, txn: lmdb.Transaction, txn_id: int, cid: bytes | None,
                     ops: list[protocol.Op], effects: list[Any] | None = None) -> Outcome:
        """Apply one batch in a transaction nested in ``txn``: all of it, or (an error)
        nothing. What it changed is appended to ``effects`` (unless None). The one batch of a
        group is applied in ``txn`` itself (a nested transaction costs a few microseconds); if
        it fails, ``_Failed`` has the group done again, nested."""
        c = self.counters
        changed: list[Any] | None = None if effects is None else []
        if self._alone:
            try:
                results = protocol.apply_ops(
                    WriteTxn(txn, self.tables, strict=True, log=changed), ops)
            except (lmdb.MapFullError, lmdb.DiskError):
                raise
            except Exception:
                raise _Failed() from None
        else:
            child = self.env.begin(write=True, parent=txn)
            try:
                results = protocol.apply_ops(
                    WriteTxn(child, self.tables, strict=True, log=changed), ops)
                child.commit()
            except (lmdb.MapFullError, lmdb.DiskError):  # the whole group is grown or refused
                child.abort()
                raise
            except Error as exc:
                child.abort()
                c.failed_batches += 1
                return _refusal(exc)
            except Exception as exc:
                child.abort()
                log.exception("batch from client %s failed unexpectedly", cid and cid.hex())
                c.failed_batches += 1
                return _refusal(InternalError(f"{type(exc).__name__}: {exc}"))
        c.batches += 1
        c.ops += len(ops)
        if effects is not None and changed:
            effects.extend(changed)
        return 0, [txn_id, results]

    def answer(self, seq: int, cmd: protocol.Command, args: Any, rv: int) -> bytes:
        """Serve a read command (or ping/stats, or a read of the slot state) from a fresh
        snapshot, for a request routed by slot map version ``rv``."""
        self.counters.reads += 1
        try:
            if cmd is protocol.PING:
                return protocol.pack_reply(seq, 0, self.health())
            if cmd is protocol.STATS:
                return protocol.pack_reply(seq, 0, self.stats())
            if cmd is protocol.SLOT_STATE:
                return protocol.pack_reply(seq, 0, self._slot_state_reply(
                    self.counters.last_txn_id))
            if cmd.handle is None:
                return protocol.pack_error(seq, ProtocolError(
                    f"shard owners do not serve command {cmd.name!r}",
                    hint="send pool reads to the reader pool (lmshard.remote.ReaderPool), or "
                    "the read command itself to the shard's owner"))
            r = self._read()
            try:
                return protocol.pack_reply(seq, 0, read_guarded(self.guard, cmd, args, rv, r))
            finally:
                r.end()
        except Error as exc:
            return protocol.pack_error(seq, exc)
        except Exception as exc:
            log.exception("read command %s failed", cmd.name)
            return protocol.pack_error(seq, InternalError(f"{type(exc).__name__}: {exc}"))

    def _slot_state_reply(self, txn_id: int) -> dict[str, Any]:
        return {"shard": self.shard, "state": self.slots.to_wire(), "txn": txn_id}

    def _record_slot_state(self, sock: zmq.Socket[bytes], ident: Peer, seq: int,
                           body: Any) -> None:
        """Record the slot state ``body`` (the ``slot_state`` command) in a write transaction
        of its own, between groups, with its change-log effect for replicas; serve by it from
        then on. The reply carries that transaction's id and, like a write's, waits for
        ``durability.replicas`` replicas."""
        try:
            new = check_new_state(self.shard, self.slots, body)
            txn_id = self._write_slot_state(new)
        except Error as exc:
            self._send(sock, ident, protocol.pack_error(seq, exc))
            return
        if new != self.slots:
            log.info("shard %d: %s recorded (txn %d)", self.shard, new.describe(), txn_id)
        self.guard = SlotGuard(self.shard, new)
        reply = protocol.pack_reply(seq, 0, self._slot_state_reply(txn_id))
        if self.holding:
            assert self.replication is not None
            self.replication.answer([(ident, reply, txn_id)], [seq], time.monotonic())
        else:
            self._send(sock, ident, reply)

    def _write_slot_state(self, new: SlotState) -> int:
        """Commit ``new``'s meta records and its change-log effect, on disk whatever the
        shard's durability (a switch forgotten in a crash would leave two shards owning the
        same slots); the txn id."""
        effect = [SLOTS_TABLE_ID, b"", msgpack.packb(new.to_wire(), use_bin_type=True)]
        while True:
            txn = self.env.begin(write=True)
            try:
                for key, value in new.records().items():
                    txn.put(key, value, db=self.meta_db)
                txn_id = txn.id()
                if self.changes is not None:
                    self.changes.append(txn, txn_id, [effect])
                txn.commit()
                break
            except lmdb.MapFullError:
                txn.abort()
                grow_map(self.env, self.config.max_map_size, str(self.path))
            except lmdb.Error as exc:
                txn.abort()
                full = self.disk_full.refused(exc, 1)
                if full is None:
                    raise
                raise full from None
            except BaseException:
                txn.abort()
                raise
        if not self.env.flags()["sync"]:
            self.env.sync(True)
        c = self.counters
        c.last_txn_id, c.last_commit_time = txn_id, time.time()
        if self.replication is not None:
            self.replication.committed(txn_id, c.last_commit_time)
        return txn_id

    def _read(self) -> ReadTxn:
        """A read snapshot that sees this owner's last commit (the caller ends it). A read
        begun right after a commit can see the transaction before it (seen in the change
        feed's reads around backup snapshots); an acked write must never be missing from a
        read that follows it, so such a read is begun again."""
        last = self.counters.last_txn_id
        r = ReadTxn(begin_read(self.env), self.tables)
        tries = 0
        while r.txn_id < last and tries < STALE_READ_TRIES:
            tries += 1
            self.counters.stale_reads += 1
            r.end()
            time.sleep(0.0002)
            r = ReadTxn(begin_read(self.env), self.tables)
        if r.txn_id < last:
            log.warning("shard %d: reads still see txn %d, %d was committed", self.shard,
                        r.txn_id, last)
        return r

    def health(self) -> dict[str, Any]:
        env = stats.map_health(self.env, self.config.max_map_size)
        return {
            "shard": self.shard,
            "pid": os.getpid(),
            **env,
            "uptime": time.time() - self.counters.started,
            "last_commit": self.counters.last_commit_time,
            **flushing.durability(self.env, self.config, self.counters),
            "disk_full": self.disk_full.as_dict(),
            "changes": stats_wire.changes_summary(self.changes_stats()),
            "member": self.member.name,
            "role": self.state.role,
            "epoch": self.state.epoch,
            "primary": self.state.primary,
            "replicas": self.replicas_status(env["txn_id"]),
            "slots": self.guard.summary(),
        }

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        s["owner"] = self.counters.as_dict()
        s["shard"] = self.shard
        changes = self.changes_stats()
        if changes is not None:
            s["changes"] = changes
        s["epoch"] = self.state.epoch
        s["slot_version"] = self.slots.version
        s["replication"] = self.replication_stats()
        return s

    def replication_stats(self, last_txn: int | None = None) -> dict[str, Any] | None:
        """Acks required, held and timed out, and each replica's progress
        (``Replication.summary``); None without replica.names."""
        if self.replication is None:
            return None
        last = self.env.info()["last_txnid"] if last_txn is None else last_txn
        return self.replication.summary(last, self._oldest_unapplied)

    def replicas_status(self, last_txn: int) -> dict[str, Any]:
        """Each replica's ``{applied, lag_txns, lag_seconds, last_heard}`` (PING's
        ``replicas``); empty without replica.names."""
        if self.replication is None:
            return {}
        return self.replication.replicas(last_txn, self._oldest_unapplied)

    def _oldest_unapplied(self, applied: int) -> float | None:
        """The commit time of the first change-log record after ``applied``; None if none."""
        if self.changes is None:
            return None
        with self.env.begin() as txn:
            records = self.changes.read(txn, applied + 1, max_records=1)
        return record_time(records[0][1]) if records else None

    def changes_stats(self) -> dict[str, Any] | None:
        """The change feed's ``ChangesChannel.stats()``; None when the log is off."""
        for ch in self.channels:
            if isinstance(ch, ChangesChannel):
                return ch.stats()
        return None

    def read(self) -> ReadTxn:  # for tests and tools in this process
        return self.store.read()  # type: ignore[return-value]

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels = []
        if self.unix is not None:
            self.unix.close()
            self.unix = None
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
            endpoint = self.member.endpoint
            if endpoint.startswith("ipc://"):  # leave no stale socket file for the next start
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint[6:])
        self.store.close()


def request_socket(ctx: zmq.Context[Any], config: Config, endpoint: str) -> zmq.Socket[bytes]:
    """The ROUTER a copy of a shard answers requests on at ``endpoint`` (an owner's, and a
    replica's, which the owner it may become takes over), bound."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_SIZE + 1024)
    if endpoint.startswith("ipc://"):
        os.makedirs(os.path.dirname(endpoint[6:]), mode=0o700, exist_ok=True)
    security.secure_server(sock, config, endpoint)
    sock.bind(endpoint)
    return sock


class _Failed(Exception):
    """The one batch of a group failed in the group's own transaction (``_apply_batch``)."""


def _refusal(err: Error) -> Outcome:
    """The outcome of a batch refused with ``err`` (with the fields it carries, like
    SlotMoved's map)."""
    return err.code, [err.message, err.hint, *err.wire_fields()]


def _older_replies(more: list[Any]) -> list[Any]:
    """The ``[seq, status, reply]`` kept for a stream's earlier batches, from the fields after a
    client record's third (none in records written before streams had them)."""
    return more[0] if more and more[0] else []


def _replay(seq: int, last_seq: int, status: int, body: Any, more: list[Any]
            ) -> tuple[int, Any]:
    """The reply to a batch this client sent before: the kept one, or "applied long ago"."""
    if seq == last_seq:
        return status, _with_epoch(status, protocol.replayed_reply(status, body), more)
    for old_seq, old_status, old_body in _older_replies(more):
        if old_seq == seq:
            return old_status, _with_epoch(old_status, protocol.replayed_reply(old_status,
                                                                               old_body), more)
    return 0, [None, None]  # long since applied; its reply is no longer kept


def _with_epoch(status: int, body: Any, more: list[Any]) -> Any:
    """A kept successful reply with the epoch its record was written at (records written
    before they kept one: as it was; the owner adds its own epoch)."""
    if status == 0 and len(more) > EPOCH_FIELD - 3 and type(body) is list and len(body) == 2:
        return [body[0], body[1], more[EPOCH_FIELD - 3]]
    return body


def run_owner(config: Config, shard: int, member: str = HOME) -> int:
    """Entry point of ``lmshardd owner`` (and of a replica's copy that is the shard's primary):
    serve copy ``member`` of ``shard`` until told to stop; the exit status."""
    where = "" if member == HOME else f" ({member})"
    try:
        owner = ShardOwner(config, shard, member=member)
    except Error as exc:
        log.error("shard %d%s cannot start: %s", shard, where, exc)
        return 2
    owner.install_signal_handlers()
    try:
        owner.load_channels()
        owner.bind()
    except Error as exc:  # e.g. ConfigError: a network endpoint without CURVE keys
        log.error("shard %d%s cannot serve: %s", shard, where, exc)
        owner.close()
        return 2
    return serve(owner)


def serve(owner: ShardOwner) -> int:
    """Serve until told to stop (or fenced by a later epoch); the exit status."""
    owner.serve_forever()
    return FENCED_EXIT if owner.fenced else 0
