"""The change log: every committed change of one LMDB environment, in commit order, resumable.

One record per write transaction that changed something, written in that same transaction
(so a change is in the log if and only if it is committed), keyed by the transaction's id as
8 big-endian bytes. A record is the commit's wall-clock time in milliseconds (8 big-endian
bytes) followed by a msgpack array of its effects, ``[table id, key, value]`` each, with
``value`` nil for a delete. Effects, not intents: an increment or a compare-and-set is logged as
the put it made, a delete of a missing row not at all, so applying the log elsewhere is
deterministic.

A *position* in a shard's log is ``(history, txn, n)``: every change of records before ``txn``
was seen, and the first ``n`` changes of record ``txn``. ``history`` names one unbroken run of the
log: a new one starts when the log is created, switched back on after running without it, or
found ahead of the environment (restored from a compacted copy, whose transaction ids start
again at 1). A position of another history, or below the log's *floor* (the first transaction
it still holds every change from), is compacted.

A *cursor* is the string form of one position per shard (``Watch.cursor``): ``c1-`` then, per
shard in order, ``HISTORY.TXN.N`` in hex joined by ``_``.

The shard owner writes the log (``lmshardd.owner``) and serves it (``lmshardd.changes``); the
embedded store writes its own when opened with ``changes=True``; ``lmshard.watch`` reads both.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from lmshard.errors import ChangesCompacted, InvalidCursor
from lmshard.store_meta import META_DB

CHANGES_DB = b"__changes__"
"""The named database of the log, beside the tables' databases."""
META_HISTORY = b"changes_history"
META_FLOOR = b"changes_floor"
META_ON = b"changes_on"
"""Records in the store's meta database: the log's history id, its floor, whether it is on."""

TRIM_STEP = 32
"""Most records one commit trims from the old end of the log."""
DEFAULT_RETAIN = 64 * 2**20
"""Default size bound of a log: 64 MiB."""
DEFAULT_RETAIN_SECONDS = 86400.0
"""Default age bound of a log: one day."""

_U64 = struct.Struct(">Q")
_packb = msgpack.Packer(use_bin_type=True).pack

CLIENTS_TABLE_ID = bytes(16)
"""The table id under which a record logged for replicas carries a client's last sequence
record (key: the client id, value: the owner's ``__clients__`` record): a copy that takes over
the shard then answers a resent batch once, as the owner would. Never shown to watchers."""
SLOTS_TABLE_ID = bytes(15) + b"\x01"
"""The table id under which a record logged for replicas carries the shard's new slot state
(key ``b""``, value the msgpack of ``SlotState.to_wire()``, ``lmshard.slot_state``), so a copy
that takes over serves by the same slot map. Never shown to watchers."""
MOVED = 1
"""The fourth field of an effect ``[table id, key, value, MOVED]`` that a re-shard wrote while it
moved rows between shards (``lmshard reshard``): replicas apply it; watchers never see it, since
no row changed."""
CLIENTS_MARK = _packb(CLIENTS_TABLE_ID)
SLOTS_MARK = _packb(SLOTS_TABLE_ID)
"""How ``SLOTS_TABLE_ID`` looks packed in a record. A record with ``MOVED`` effects also holds
an effect ``[SLOTS_TABLE_ID, b"moved", nil]``, so a record without these bytes holds nothing a
watcher must not see but client records."""
"""How ``CLIENTS_TABLE_ID`` looks packed in a record: a record without these bytes holds no
client record, and a watch of everything may be sent it as it is stored."""

Effect = tuple[bytes, bytes, bytes | None]
"""One logged change: ``(table id, key, value or None for a delete)``, all encoded."""


def log_key(txn_id: int) -> bytes:
    """The log's key of the record of transaction ``txn_id``."""
    key: bytes = _U64.pack(txn_id)
    return key


def pack_record(effects: list[Any], now: float | None = None) -> bytes:
    """A record: the time in ms, then the msgpack array of ``effects``."""
    ms = int((time.time() if now is None else now) * 1000)
    record: bytes = _U64.pack(ms) + _packb(effects)
    return record


def record_time(record: bytes | memoryview) -> float:
    """When a record was committed, in seconds since the epoch."""
    return float(_U64.unpack_from(record)[0]) / 1000


def record_effects(record: bytes | memoryview) -> list[list[Any]]:
    """The effects of a record, as ``[table id, key, value]`` lists."""
    out: list[list[Any]] = msgpack.unpackb(memoryview(record)[8:], raw=False, use_list=True)
    return out


@dataclass(frozen=True, slots=True)
class Position:
    """A place in one shard's log: records before ``txn`` and ``n`` changes of ``txn`` seen."""

    history: str
    txn: int
    n: int = 0


# -- cursors -----------------------------------------------------------------------------------

_CURSOR_PREFIX = "c1-"
_HISTORY_RE = re.compile(r"[0-9a-f]{16}")


def format_cursor(positions: tuple[Position, ...] | list[Position]) -> str:
    """The cursor string of one position per shard."""
    return _CURSOR_PREFIX + "_".join(f"{p.history}.{p.txn:x}.{p.n:x}" for p in positions)


def parse_cursor(cursor: Any, shards: int) -> list[Position]:
    """The positions of a cursor string, one per shard (InvalidCursor if it is not one)."""
    if not isinstance(cursor, str) or not cursor.startswith(_CURSOR_PREFIX) or len(cursor) > 8192:
        raise InvalidCursor(f"not a change-feed cursor: {cursor!r:.80}")
    parts = cursor[len(_CURSOR_PREFIX):].split("_")
    out = []
    for part in parts:
        fields = part.split(".")
        if len(fields) != 3 or not _HISTORY_RE.fullmatch(fields[0]):
            raise InvalidCursor(f"not a change-feed cursor: {cursor!r:.80}")
        try:
            txn, n = int(fields[1], 16), int(fields[2], 16)
        except ValueError:
            raise InvalidCursor(f"not a change-feed cursor: {cursor!r:.80}") from None
        if not (0 <= txn < 2**63 and 0 <= n < 2**32):
            raise InvalidCursor(f"not a change-feed cursor: {cursor!r:.80}")
        out.append(Position(fields[0], txn, n))
    if len(out) != shards:
        raise InvalidCursor(
            f"the cursor holds positions for {len(out)} shards, this store has {shards}",
            hint="a cursor works only with the service (and shard count) it came from")
    return out


# -- one environment's log ---------------------------------------------------------------------


class ChangeLog:
    """The change log of one environment: opened in its first write transaction, appended to in
    every commit that changes something, trimmed to its retention a few records at a time."""

    def __init__(self, env: lmdb.Environment, *, retain: int = DEFAULT_RETAIN,
                 retain_seconds: float = DEFAULT_RETAIN_SECONDS) -> None:
        self.env = env
        self.retain = retain
        self.retain_seconds = retain_seconds
        self.db: Any = None
        self.meta_db: Any = None
        self.history = ""
        self.floor = 0
        self._psize = env.stat()["psize"]
        self._check_bytes = max(1, min(64 * 2**10, retain // 16))
        self._check_seconds = min(1.0, retain_seconds / 4)
        self._unchecked = 0
        self._next_check = 0.0
        self._more_to_trim = False

    def open(self, txn: lmdb.Transaction, meta_db: Any, meta: dict[bytes, bytes],
             enabled: bool) -> bool:
        """Open (or create, or start anew, or switch off) the log in the environment's first
        write transaction ``txn``. True when a new history was started."""
        self.db = self.env.open_db(CHANGES_DB, txn=txn)
        self.meta_db = meta_db
        if not enabled:
            if meta.get(META_ON) != b"0":
                txn.drop(self.db, delete=False)  # a gap is coming: what is kept is useless
                txn.put(META_ON, b"0", db=meta_db)
            return False
        history = meta.get(META_HISTORY, b"").decode()
        last_committed = txn.id() - 1
        newest = self._newest_key(txn)
        fresh = (not _HISTORY_RE.fullmatch(history) or meta.get(META_ON) != b"1"
                 or (newest is not None and newest > last_committed))
        if fresh:
            txn.drop(self.db, delete=False)
            history = os.urandom(8).hex()
            self.floor = txn.id() + 1
            txn.put(META_HISTORY, history.encode(), db=meta_db)
            txn.put(META_FLOOR, str(self.floor).encode(), db=meta_db)
            txn.put(META_ON, b"1", db=meta_db)
        else:
            self.floor = int(meta.get(META_FLOOR, b"0"))
        self.history = history
        return fresh

    def attach_readonly(self) -> None:
        """Find the log of an environment this process opened read-only (another process
        writes it); ``refresh`` reads its history and floor."""
        # Not in a read transaction of ours: handles opened in one do not outlive it (the next
        # read with them fails with EINVAL); open_db without txn commits its own.
        try:
            self.db = self.env.open_db(CHANGES_DB, create=False)
            self.meta_db = self.env.open_db(META_DB, create=False)
        except lmdb.NotFoundError:
            self.db = None
            return
        with self.env.begin() as txn:
            self.refresh(txn)

    def refresh(self, txn: lmdb.Transaction) -> None:
        """Read the history and floor another process (the writer) may have moved."""
        if self.meta_db is None:
            return
        on = txn.get(META_ON, db=self.meta_db) == b"1"
        self.history = bytes(txn.get(META_HISTORY, db=self.meta_db) or b"").decode() if on else ""
        self.floor = int(txn.get(META_FLOOR, db=self.meta_db) or b"0")

    @property
    def enabled(self) -> bool:
        return bool(self.history)

    def _newest_key(self, txn: lmdb.Transaction) -> int | None:
        cur = txn.cursor(db=self.db)
        if not cur.last():
            return None
        return int(_U64.unpack(cur.key())[0])

    # -- writing (in a write transaction) ----------------------------------------------------------

    def append(self, txn: lmdb.Transaction, txn_id: int, effects: list[Any]) -> None:
        """Record ``effects`` as transaction ``txn_id``'s (nothing when there are none), and
        trim the old end of the log if it is past its retention: looked at once the records
        appended since the last look add up to a sixteenth of ``retain`` (at most 64 KiB), a
        quarter of ``retain_seconds`` (at most 1 s) has passed, or the last look left more to
        trim; not on every commit (its page count and oldest record cost more than the
        append)."""
        if not effects:
            return
        record = pack_record(effects)
        txn.put(_U64.pack(txn_id), record, db=self.db)
        self._unchecked += len(record) + 24
        now = time.time()
        if (self._unchecked >= self._check_bytes or now >= self._next_check
                or self._more_to_trim):
            self._unchecked = 0
            self._next_check = now + self._check_seconds
            self._more_to_trim = self.trim(txn, now) >= TRIM_STEP

    def trim(self, txn: lmdb.Transaction, now: float | None = None) -> int:
        """Drop up to TRIM_STEP of the oldest records while the log is over its size or age
        bound; never the newest record (it tells a restored copy from the original). The
        number dropped."""
        cur = txn.cursor(db=self.db)
        if not cur.first():
            return 0
        size = self.size(txn)
        cutoff = (time.time() if now is None else now) - self.retain_seconds
        dropped = 0
        last_dropped = None
        while dropped < TRIM_STEP:
            if size <= self.retain and record_time(cur.value()) >= cutoff:
                break
            key = cur.key()
            size -= len(cur.value()) + len(key) + 16
            if not cur.next():
                break  # keep the newest record
            txn.delete(key, db=self.db)
            last_dropped = key
            dropped += 1
        if last_dropped is not None:
            self.floor = int(_U64.unpack(last_dropped)[0]) + 1
            txn.put(META_FLOOR, str(self.floor).encode(), db=self.meta_db)
        return dropped

    # -- reading (in any transaction) --------------------------------------------------------------

    def size(self, txn: lmdb.Transaction) -> int:
        """Bytes of the map the log takes."""
        s = txn.stat(self.db)
        return int(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * self._psize

    def bounds(self, txn: lmdb.Transaction) -> tuple[int | None, int | None]:
        """The transaction ids of the oldest and newest records (None, None when empty)."""
        cur = txn.cursor(db=self.db)
        if not cur.first():
            return None, None
        oldest = int(_U64.unpack(cur.key())[0])
        cur.last()
        return oldest, int(_U64.unpack(cur.key())[0])

    def resolve(self, since: Position | str | None, last_txn: int, shard: int | None = None
                ) -> Position:
        """The position a watch starts at: ``since`` checked against this log, or for "now"
        (None) the end, for "start" the floor. ChangesCompacted when ``since`` is gone;
        InvalidCursor when it is ahead of the log."""
        if not self.enabled:
            raise ChangesCompacted(
                f"{_where(shard)} keeps no change log ([changes] enabled = false)",
                hint="switch the log on in [changes]", shard=shard)
        if since is None or since == "now":
            return Position(self.history, last_txn + 1)
        if since == "start":
            return Position(self.history, self.floor)
        assert isinstance(since, Position)
        oldest = Position(self.history, self.floor)
        if since.history != self.history:
            raise ChangesCompacted(
                f"{_where(shard)}'s change log was started anew (a restore, or the log switched "
                "off and on) since this cursor was taken", oldest=_single(oldest), shard=shard)
        if since.txn < self.floor:
            raise ChangesCompacted(
                f"{_where(shard)}'s change log no longer holds transaction {since.txn}: it "
                f"keeps transactions from {self.floor} on", oldest=_single(oldest), shard=shard)
        if since.txn > last_txn + 1:
            raise InvalidCursor(
                f"the cursor is ahead of {_where(shard)}: transaction {since.txn}, the last "
                f"committed is {last_txn}",
                hint="a cursor works only with the store it came from")
        return since

    def read(self, txn: lmdb.Transaction, start: int, *, max_records: int = 256,
             max_bytes: int = 4 * 2**20) -> list[tuple[int, bytes]]:
        """Records from transaction ``start`` on, as ``(txn id, record)``, up to the limits
        (at least one record if there is any)."""
        cur = txn.cursor(db=self.db)
        out: list[tuple[int, bytes]] = []
        if not cur.set_range(_U64.pack(start)):
            return out
        total = 0
        for key, value in cur.iternext():
            out.append((int(_U64.unpack(key)[0]), bytes(value)))
            total += len(value)
            if len(out) >= max_records or total >= max_bytes:
                break
        return out


def _where(shard: int | None) -> str:
    return "the store" if shard is None else f"shard {shard}"


def _single(p: Position) -> str:
    return format_cursor([p])


def filter_effects(effects: list[list[Any]], first: int, tables: frozenset[bytes] | None,
                   prefix: bytes | None) -> tuple[list[int], list[list[Any]]]:
    """The effects from index ``first`` on that match a watch (its table ids, a key prefix),
    with their indexes in the record. Client records (``CLIENTS_TABLE_ID``), slot states
    (``SLOTS_TABLE_ID``) and rows a re-shard moved (``MOVED``) are for replicas and never
    match."""
    idx: list[int] = []
    out: list[list[Any]] = []
    for i in range(first, len(effects)):
        e = effects[i]
        if (e[0] == CLIENTS_TABLE_ID or e[0] == SLOTS_TABLE_ID or len(e) > 3
                or (tables is not None and e[0] not in tables)):
            continue
        if prefix is not None and not e[1].startswith(prefix):
            continue
        idx.append(i)
        out.append(e)
    return idx, out
