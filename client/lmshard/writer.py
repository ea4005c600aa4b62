"""Pipelined bulk writes: ``Client.writer()`` keeps several batches in flight per shard.

``Client.batch()`` sends one message per shard and waits for every ack, so the client sits idle
while the owners apply and fsync. A ``Writer`` fills a buffer per shard, sends it as a batch when
it holds ``batch_size`` ops, and goes on encoding while up to ``window`` batches per shard are
in flight: the client's encoding, the owner's apply and the disk's fsync overlap.

Each shard gets one stream: its own client id and DEALER socket (``OwnerConnections.socket``),
sequence numbers 1, 2, 3, ..., and every batch names the one it follows (protocol command
``write_after``). The owner applies a
batch only right after the one it follows, so the batches of a stream are applied in the order
they were sent even when a connection breaks: a batch that arrives after a lost one is refused
(OutOfOrder) and the writer resends every unacknowledged batch oldest first, on a fresh socket.
The owner keeps the replies of a stream's last ``PIPELINE_WINDOW`` batches, so a resent batch that
was applied is answered again and not applied twice.

After a failover (a ``NotPrimary`` answer, or a shard silent through every retry while another
copy is primary now: ``OwnerConnections.follow``) the stream moves to the new primary and resends
every unacknowledged batch there, oldest first, as after a broken connection: the new primary
holds the replicated client records, so it answers the batches the old one applied from their
kept replies.

Each batch is atomic on its shard. A batch the owner refuses (a unique violation, a bad value)
is applied not at all, and the stream goes on; the writer raises ``BatchesFailed`` naming the
refused batches at its next call (``put``, ``flush`` or the end of the ``with`` block).

Re-sharding (``lmshard.slot_routes``). Batches carry the version of the slot map the writer
routes by. A batch refused with ``SlotMoved`` was not applied and writes no client record, so
the stream's later batches come back OutOfOrder: the writer adopts the newer map, sends nothing
more until every batch in flight is answered, then routes the refused batches' ops and every
buffered op again (each old stream's ops in their order) and sends them as new batches; the
refused stream's next batch follows the last one its shard applied. A batch refused with
``SlotsMoving`` holds its stream: after a short wait the unanswered batches are sent again as
they were (same sequence numbers), until the move switches (``SlotsMoving`` is raised when it
takes longer than the retries would wait for a silent owner).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from lmshard.client_counters import ClientCounters
from lmshard.client_tables import ClientTables
from lmshard.errors import (
    BatchesFailed,
    Error,
    NotPrimary,
    OutOfOrder,
    ShardUnavailable,
    SlotMoved,
    SlotsMoving,
    TransactionError,
    error_from_wire,
)
from lmshard.protocol import (
    MAX_OPS_PER_BATCH,
    OP_DELETE,
    OP_INCR,
    OP_PUT,
    PIPELINE_WINDOW,
    WRITE_AFTER,
    ZERO_COPY_MIN,
    incr_delta,
    op,
    pack_request,
    unpack_frame,
)
from lmshard.slot_routes import follow_moved, moving_waits
from lmshard.txn import TableRef

if TYPE_CHECKING:
    from lmshard.client_tables import ClientTable

log = logging.getLogger("lmshard.writer")


class StreamOwners(Protocol):
    """What a ``Writer`` uses of the owner connections (``OwnerConnections``, or the async
    client's): a fresh socket per shard stream, timeout and retries, counters."""

    @property
    def counters(self) -> ClientCounters: ...

    @property
    def write_timeout_ms(self) -> int: ...

    @property
    def retries(self) -> int: ...

    def socket(self, shard: int) -> zmq.Socket[bytes]: ...

    def endpoint(self, shard: int) -> str: ...

    def epoch(self, shard: int) -> int: ...

    def note_ack(self, shard: int, body: Any) -> None: ...

    def follow(self, shard: int, answer: NotPrimary | None) -> bool: ...

    def moving_limit_s(self, write: bool) -> float: ...


class WriterClient(Protocol):
    """What a ``Writer`` uses of its client: the tables (encoding and routing) and the owner
    connections."""

    @property
    def tables(self) -> ClientTables: ...

    @property
    def owners(self) -> StreamOwners: ...

_OUT_OF_ORDER = OutOfOrder.code
_NOT_PRIMARY = NotPrimary.code
_SLOT_MOVED = SlotMoved.code
_SLOTS_MOVING = SlotsMoving.code
_RESHARD_ANSWERS = frozenset({_SLOT_MOVED, _SLOTS_MOVING, _OUT_OF_ORDER})


class _Stream:
    """One shard's ordered stream of batches: buffer, socket, and what is in flight."""

    __slots__ = ("shard", "cid", "sock", "endpoint", "seq", "after", "buf", "inflight",
                 "attempts", "refused", "hold_until", "holding_since", "waits")

    def __init__(self, shard: int, sock: zmq.Socket[bytes], endpoint: str) -> None:
        self.shard = shard
        self.cid = uuid.uuid4().bytes
        self.sock = sock
        self.endpoint = endpoint
        """The endpoint of the copy the socket is connected to."""
        self.seq = 0
        self.after = 0
        """The batch the next one follows: the last sent, or after a SlotMoved refusal the
        last the shard applied."""
        self.buf: list[list[Any]] = []
        # seq -> [frame, ops, deadline, after, map version], in the order sent (dicts keep
        # insertion order)
        self.inflight: dict[int, list[Any]] = {}
        self.attempts = 0
        self.refused: list[tuple[int, list[Any]]] = []
        """(seq, entry) of batches a re-shard made this shard refuse, to route again."""
        self.hold_until: float | None = None
        """While a move switches slots of a batch in flight (SlotsMoving): when to resend."""
        self.holding_since = 0.0
        self.waits: Any = None


class WriterStreams:
    """The streams of a writer, one per shard: buffers, batches in flight, replies, resends.

    Shared by ``Writer`` and the async client's writer (``lmshard.aio_writer``): the two
    differ only in how they wait for replies.
    """

    def __init__(self, client: WriterClient, *, batch_size: int = 1000, window: int = 4) -> None:
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_OPS_PER_BATCH:
            raise TransactionError(
                f"batch_size must be an int in 1..{MAX_OPS_PER_BATCH:,}, not {batch_size!r}")
        if type(window) is not int or not 1 <= window <= PIPELINE_WINDOW:
            raise TransactionError(
                f"window must be an int in 1..{PIPELINE_WINDOW} (batches in flight "
                f"per shard), not {window!r}")
        self._tables = client.tables
        self._routes = client.tables.routes
        self._version = self._routes.version
        """The version of the slot map the buffered ops were routed by (no newer)."""
        self._rerouting = False
        """A batch was refused with SlotMoved: nothing is sent until every batch in flight
        is answered, then the refused and buffered ops are routed again."""
        self._owners = client.owners
        self.batch_size = batch_size
        self.window = window
        self._streams: dict[int, _Stream] = {}
        self._failed: list[tuple[int, int, Error]] = []
        self.committed = 0
        """Batches acknowledged as applied so far."""
        self.ops_committed = 0
        """Ops in those batches."""
        self._closed = False

    def _buffered(self, ct: ClientTable, key: Any, code: int, arg: Any) -> _Stream | None:
        """Add one op to its shard's buffer; the shard's stream once the buffer is full."""
        kb = ct.kenc(key)
        st = self._stream(ct.shard(key, kb))
        st.buf.append(op(code, ct.tid, kb, arg))
        return st if len(st.buf) >= self.batch_size else None

    def close(self) -> None:
        """Close the writer's sockets; ops still buffered are dropped (``flush`` first)."""
        if self._closed:
            return
        self._closed = True
        for st in self._streams.values():
            st.sock.close(linger=0)
        self._streams.clear()

    def _stream(self, shard: int) -> _Stream:
        st = self._streams.get(shard)
        if st is None:
            if self._closed:
                raise TransactionError("this writer is closed",
                                       hint="open another: client.writer()")
            st = self._streams[shard] = _Stream(shard, self._owners.socket(shard),
                                                self._owners.endpoint(shard))
        return st

    def _launch(self, st: _Stream) -> None:
        """Send the stream's buffer (up to batch_size ops of it) as its next batch (the window
        has room)."""
        if len(st.buf) > self.batch_size:
            ops, st.buf = st.buf[:self.batch_size], st.buf[self.batch_size:]
        else:
            ops, st.buf = st.buf, []
        after = st.after
        st.seq += 1
        st.after = st.seq
        version = self._version
        frame = pack_request(WRITE_AFTER.code, st.cid, st.seq, WRITE_AFTER.build(after, ops),
                             self._owners.epoch(st.shard), version)
        deadline = time.monotonic() + self._owners.write_timeout_ms / 1000
        st.inflight[st.seq] = [frame, ops, deadline, after, version]
        counters = self._owners.counters.mine()
        counters["batches_sent"] += 1
        counters["ops_sent"] += len(ops)
        self._transmit(st, frame)

    @staticmethod
    def _transmit(st: _Stream, frame: bytes) -> None:
        try:
            st.sock.send(frame, zmq.NOBLOCK, len(frame) < ZERO_COPY_MIN)
        except zmq.Again:
            pass  # the queue to that shard is full: the timeout resends it

    def _active(self) -> list[_Stream]:
        """The streams with batches in flight."""
        return [st for st in self._streams.values() if st.inflight]

    @staticmethod
    def _wait_ms(active: list[_Stream]) -> int:
        """How long to wait for replies: until the earliest deadline of a batch in flight."""
        first = min(next(iter(st.inflight.values()))[2] for st in active)
        return max(0, int((first - time.monotonic()) * 1000) + 1)

    def _expire(self, active: list[_Stream]) -> None:
        """Resend the batches of each stream whose oldest batch went unanswered too long (or
        whose wait for a move to switch is over); route again once a refusal's stream and
        every other are answered."""
        now = time.monotonic()
        for st in active:
            if st.hold_until is not None:
                if now >= st.hold_until:
                    st.hold_until = None
                    self._resend(st, "slots of a batch were switching to another shard",
                                 moved=True)
            elif st.inflight and next(iter(st.inflight.values()))[2] <= now:
                self._owners.counters.mine()["timeouts"] += 1
                self._resend(st, f"no answer in {self._owners.write_timeout_ms} ms")
        self._reroute()

    def _reroute(self) -> None:
        """Once every batch in flight is answered after a SlotMoved refusal: route the refused
        batches' ops and the buffered ops again under the current map (each stream's in its
        order, the refused before the buffered), into the streams' buffers."""
        if not self._rerouting or any(st.inflight for st in self._streams.values()):
            return
        self._rerouting = False
        version = self._routes.version  # before routing: batches never claim a newer map
        pending: list[list[Any]] = []
        for st in list(self._streams.values()):
            if st.refused:
                st.refused.sort(key=lambda r: r[0])
                st.after = st.refused[0][1][3]  # the last batch the shard applied
                for _, entry in st.refused:
                    pending.extend(entry[1])
                st.refused = []
            pending.extend(st.buf)
            st.buf = []
        self._version = version
        shard_of = self._tables.shard_of_op
        for o in pending:
            self._stream(shard_of(o)).buf.append(o)
        log.info("%d ops routed again under slot map version %d", len(pending), version)

    def _reshard_answer(self, st: _Stream, seq: int, entry: list[Any], status: int,
                        body: Any) -> bool:
        """Take an answer a re-shard may explain (SlotMoved, SlotsMoving, OutOfOrder after
        either); whether it was."""
        if status == _SLOT_MOVED:
            err = error_from_wire(status, *body)
            if not follow_moved(self._routes, err, entry[4]):
                raise err
            self._refuse(st, seq, entry)
        elif status == _SLOTS_MOVING:
            self._hold(st)  # sent again, as it is, once the wait is over
        elif st.refused:
            self._refuse(st, seq, entry)  # it follows a refused batch
        elif st.hold_until is None:
            return False  # a batch was lost
        return True

    def _refuse(self, st: _Stream, seq: int, entry: list[Any]) -> None:
        """Batch ``seq`` of the stream was not applied because a re-shard moved slots of its
        stream's batches: route it again (``_reroute``)."""
        del st.inflight[seq]
        st.refused.append((seq, entry))
        self._rerouting = True

    def _hold(self, st: _Stream) -> None:
        """A batch of the stream met slots switching to another shard (SlotsMoving): resend
        the stream's batches after a short wait; SlotsMoving when the switch takes longer than
        the retries would wait for a silent owner."""
        now = time.monotonic()
        if st.waits is None:
            st.waits = moving_waits()
            st.holding_since = now
        elif now - st.holding_since > self._owners.moving_limit_s(True):
            raise SlotsMoving(
                f"shard {st.shard}: slots of a batch of this writer are still switching to "
                f"another shard after {now - st.holding_since:.1f} s; "
                f"{len(st.inflight)} batches are unacknowledged (each applied fully or not "
                "at all)", hint="check the re-shard: lmshard reshard --status")
        st.hold_until = now + next(st.waits)
        for entry in st.inflight.values():
            entry[2] = st.hold_until

    def _receive(self, st: _Stream) -> None:
        """Take every reply waiting on the stream's socket."""
        sock = st.sock
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            seq, status, body = unpack_frame(frame)
            entry = st.inflight.get(seq)
            if entry is None:
                continue  # the answer to a batch sent twice: the first answer was taken
            if status in _RESHARD_ANSWERS and self._reshard_answer(st, seq, entry, status,
                                                                   body):
                continue
            if status == _OUT_OF_ORDER:
                self._resend(st, "a batch of the stream was lost")
                return  # the old socket is gone, with whatever else it held
            if status == _NOT_PRIMARY and self._moved(st, error_from_wire(status, *body)):
                self._resend(st, "the copy it wrote to is not the primary now", moved=True)
                return
            del st.inflight[seq]
            if seq < min(st.inflight, default=seq + 1):
                st.attempts = 0
                st.waits = None
            if status == 0:
                self.committed += 1
                self.ops_committed += len(entry[1])
                self._owners.note_ack(st.shard, body)
            else:
                err = error_from_wire(status, *body)
                self._owners.counters.mine()["batches_failed"] += 1
                self._failed.append((st.shard, len(entry[1]), err))

    def _moved(self, st: _Stream, answer: Error | None) -> bool:
        """Whether the stream's shard is served by another copy now: it was moved already (by
        another call), or ``answer`` (a NotPrimary, or None: silence) moves it."""
        if st.endpoint != self._owners.endpoint(st.shard):
            return True
        return ((answer is None or isinstance(answer, NotPrimary))
                and self._owners.follow(st.shard, answer))

    def _resend(self, st: _Stream, why: str, moved: bool = False) -> None:
        """Reconnect and resend every unacknowledged batch of the stream, oldest first (to the
        copy that is primary now, when it ``moved``: with a fresh count of attempts)."""
        owners = self._owners
        if moved:
            st.attempts = 0
        else:
            st.attempts += 1
            if st.attempts > owners.retries and self._moved(st, None):
                st.attempts = 0
        if st.attempts > owners.retries:
            raise ShardUnavailable(
                f"shard {st.shard} at {owners.endpoint(st.shard)}: {why}, "
                f"{st.attempts} attempts; {len(st.inflight)} batches of this writer are "
                "unacknowledged (each applied fully or not at all)",
                hint="check that the shard owner runs: lmshard status; its log names the cause",
            )
        owners.counters.mine()["retries"] += 1
        log.info("shard %d: %s: reconnecting, resending %d batches from sequence %d",
                 st.shard, why, len(st.inflight), next(iter(st.inflight)))
        st.sock.close(linger=0)
        st.endpoint = owners.endpoint(st.shard)
        st.sock = owners.socket(st.shard)
        deadline = time.monotonic() + owners.write_timeout_ms / 1000
        for entry in st.inflight.values():
            entry[2] = deadline
            self._transmit(st, entry[0])

    def _raise_failed(self) -> None:
        if not self._failed:
            return
        failed, self._failed = self._failed, []
        shard, nops, first = failed[0]
        raise BatchesFailed(
            f"{len(failed)} batch(es) refused ({sum(n for _, n, _ in failed):,} ops, none of "
            f"them applied); the first, on shard {shard}: {first}",
            failed=failed, committed=self.committed,
        )


class Writer(WriterStreams):
    """Buffered, pipelined writes through a ``Client``; use it from one thread.

    ``put``, ``delete`` and ``incr`` encode at the call (bad keys and values raise there, nothing
    sent); ``flush()`` sends what is buffered and waits until every batch is acknowledged; the
    end of a ``with`` block flushes. After a clean flush every op is committed with the
    configured durability. Per-op results are not returned: use ``Client.batch()`` for those.
    """

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None) -> None:
        # The hot path of bulk writes: _add and protocol.op inlined.
        ct = self._tables[table]
        kb = ct.kenc(key)
        vb = ct.dumps(value) if ttl is None else ct.encode(value, ttl)
        shard = ct.shard(key, kb)
        st = self._streams.get(shard) or self._stream(shard)
        st.buf.append([OP_PUT, ct.tid, kb, vb])
        if len(st.buf) >= self.batch_size:
            self._send(st)

    def delete(self, table: TableRef, key: Any) -> None:
        self._add(table, key, OP_DELETE, None)

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> None:
        self._add(table, key, OP_INCR, incr_delta(delta))

    def _add(self, table: TableRef, key: Any, code: int, arg: Any) -> None:
        st = self._buffered(self._tables[table], key, code, arg)
        if st is not None:
            self._send(st)

    def flush(self) -> None:
        """Send every buffered op and wait until every batch in flight is acknowledged;
        BatchesFailed if a shard refused any batch since the last call that raised."""
        while True:
            for st in list(self._streams.values()):
                while st.buf:
                    self._send(st)
            if not self._rerouting and not self._active():
                break
            self._pump()  # (ops routed again land in the buffers: sent on the next round)
        self._raise_failed()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

    def _send(self, st: _Stream) -> None:
        self._raise_failed()
        while self._rerouting or len(st.inflight) >= self.window:
            self._pump()
            self._raise_failed()
        if st.buf:  # (routing again may have moved its ops to other streams)
            self._launch(st)

    def _pump(self) -> None:
        """Wait for replies (up to the earliest deadline); handle them and any timeout."""
        active = self._active()
        if not active:
            self._reroute()
            return
        wait_ms = self._wait_ms(active)
        if len(active) == 1:
            st = active[0]
            if st.sock.poll(wait_ms):
                self._receive(st)
        else:
            poller = zmq.Poller()
            for st in active:
                poller.register(st.sock, zmq.POLLIN)
            ready = dict(poller.poll(wait_ms))
            for st in active:
                if st.sock in ready:
                    self._receive(st)
        self._expire(active)
