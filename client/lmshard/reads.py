"""Where a client's reads are served: this process's read-only maps, or over the wire.

On the owners' host a client opens each shard's environment read-only, once per process, on
first use (``LocalShards``); reads there are plain LMDB reads, no IPC. A shard whose files cannot
be opened here (another host, ``local_reads = false``) is read over the wire (``RemoteReads``):
through the reader pool when the service runs one, else from the shard's owner.

On a replica host (``replica.local``) the environments opened are that replica's copies, which
follow the primary with some lag. Read-your-writes: a client keeps, per shard, the ``(epoch, txn
id)`` of its last ack from a copy other than this host's, until a read sees it; a read of that
shard compares it, inside the read transaction that serves the read, with what the copy has
(``lmshard.members``: ``(replica_applied_epoch, replica_applied)``, or ``(epoch, txn id)`` of a
copy that is primary itself), and waits for the copy (a new read transaction each try) up to
``client.replica_wait``, then raises ReplicaBehind. A read of a shard with no such ack waits for
nothing; on the owners' host every ack comes from the copy read here, so none is kept.

Re-sharding. A local read also reads the shard's slot state in its read transaction
(``lmshard.slot_state``; ``slot_map_version`` and ``slot_moves``): a newer map than the client's
is adopted (``SlotRoutes.adopt``; the caller routes again when ``routes.generation`` moved),
and the rows of slots the shard must not serve (``slot_state.ForeignRows``) are skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import lmdb

from lmshard.client_tables import ClientTable, ClientTables, LocalHandles
from lmshard.config import Config
from lmshard.connections import OwnerConnections
from lmshard.errors import Error, ReplicaBehind
from lmshard.map_growth import begin_read
from lmshard.members import PRIMARY, read_state
from lmshard.point_get import SLOTS_CHANGED, routed_get
from lmshard.protocol import READ_CODES, SCAN, paged_scan
from lmshard.remote import ReaderPool
from lmshard.schema import Schema
from lmshard.slot_routes import SlotRoutes, shard_view
from lmshard.slot_state import NO_MOVES, ForeignRows, RecordedState
from lmshard.store import Store
from lmshard.store_meta import META_DB
from lmshard.txn import ReadTxn, Snapshot

log = logging.getLogger("lmshard.client")

Request = tuple[int, Any]
"""A request's (command code, body), built by its command (``Command.request_for``)."""

NOT_HERE = object()
"""``LocalShards.row`` of a shard not open here: read it over the wire."""
REPLICA_POLL_S = 0.002
"""How long a read that waits for this host's replica to have the client's last write sleeps
between two looks (each in a new read transaction)."""


class _Meta:
    """A copy's meta records as ``members.read_state`` reads them, inside one read txn."""

    __slots__ = ("txn", "db")

    def __init__(self, txn: Any, db: Any) -> None:
        self.txn = txn
        self.db = db

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self.txn.get(key, db=self.db)
        return value


class LocalShards:
    """The shards' environments opened read-only in this process (this host's copy of each:
    ``config.local_member``); None for a shard read over the wire. And, per shard, the last
    ack a read must see (``note_ack``)."""

    def __init__(self, config: Config, schema: Schema, *, enabled: bool,
                 tables: ClientTables | None = None, routes: SlotRoutes | None = None) -> None:
        self.config = config
        self.routes = routes if routes is not None else SlotRoutes.of_config(config)
        """The slot map the client routes by, which reads check the shards' against."""
        self._views: dict[tuple[int, bytes | None, bytes | None, int], ForeignRows | None] = {}
        self._recorded: dict[int, RecordedState] = {}
        """Per shard, its slot state as this process's reads last found it."""
        self.schema = schema
        self.enabled = enabled
        self.member = config.local_member
        """The copy this host holds, which local reads open."""
        self._tables = tables.each() if tables is not None else []
        self._stores: list[Store | None] = [None] * config.shards
        self._remote_only: set[int] = set()
        self._lock = threading.Lock()
        self.unseen: list[tuple[int, int] | None] = [None] * config.shards
        """Per shard, ``(epoch, txn id)`` of the last ack from another copy that no read here
        has seen yet; None when a read waits for nothing."""
        self._meta_dbs: dict[int, tuple[lmdb.Environment, Any]] = {}
        self._seen: dict[int, tuple[Any, int, int, ForeignRows | None]] = {}
        """Per shard, the last snapshot ``foreign`` looked at: (environment, txn id, routes
        generation, its answer), replaced whole (threads share it)."""

    def grow(self, config: Config) -> None:
        """Read the shards ``config`` has beyond the current one's too (a re-shard added
        them)."""
        with self._lock:
            extra = config.shards - len(self._stores)
            if extra > 0:
                self._stores = self._stores + [None] * extra
                self.unseen = self.unseen + [None] * extra
            self.config = config

    def get(self, shard: int) -> Store | None:
        """The shard's store opened read-only here (opened now if need be), or None."""
        st = self._stores[shard]
        if st is not None or not self.enabled or shard in self._remote_only:
            return st
        with self._lock:
            st = self._stores[shard]
            if st is None and shard not in self._remote_only:
                st = self._open(shard)
        return st

    def _open(self, shard: int) -> Store | None:
        path = self.config.member(shard, self.member).dir
        try:
            st = Store(path, self.schema, readonly=True, max_readers=self.config.max_readers)
        except Error as exc:
            if not os.path.exists(os.path.join(path, "data.mdb")):
                return None  # a shard a re-shard is adding: its owner creates it soon
            log.warning("shard %d: reading through the owner, the files at %s cannot "
                        "be opened here: %s", shard, path, exc)
            self._remote_only.add(shard)
            return None
        self._stores[shard] = st
        return st

    def handles(self, ct: ClientTable, shard: int) -> LocalHandles | None:
        """(environment, database, meta database, the snapshot last seen at the client's slot
        map version: ``point_get.routed_get``, the unique indexes' databases by name) of table
        ``ct`` on ``shard`` when the shard is open here, kept in ``ct.local`` for the point gets
        and unique lookups that follow; None: read over the wire, or (when ``get`` has the
        store) through ``read``, as a read must wait for an ack."""
        st = self.get(shard)
        if st is None or self.unseen[shard] is not None:
            return None
        env = st.env  # first: after a fork it opens the environment again, and binds the tables
        bt = st.tables[ct.table]
        hit = ct.local[shard] = (env, bt.db, self.meta_db(st), [(-1, b"")],
                                 {bi.name: bi.db for bi in bt.indexes if bi.unique})
        if self.unseen[shard] is not None:  # an ack came in meanwhile: note_ack may have
            ct.local[shard] = None           # cleared ct.local before the line above
            return None
        return hit

    def row(self, ct: ClientTable, shard: int, key: bytes) -> Any:
        """The stored bytes under the encoded ``key`` (None: no row) of table ``ct`` in this
        host's copy of ``shard``; NOT_HERE when the shard is not open here."""
        hit = self.handles(ct, shard)
        if hit is not None:
            data = routed_get(hit[0], hit[1], key, hit[2], self.routes.version_bytes, hit[3])
            if data is not SLOTS_CHANGED:
                return data
        st = self.get(shard)
        if st is None:
            return NOT_HERE
        with self.read(shard, st) as r:
            foreign = self.foreign(shard, st, r.txn)
            if foreign is not None and not foreign.keep(ct, key):
                return None
            return r.txn.get(key, db=st.tables[ct.table].db)

    # -- re-sharding -------------------------------------------------------------------------

    def meta_db(self, st: Store) -> Any:
        """The meta database handle of ``st``'s environment."""
        env = st.env
        cached = self._meta_dbs.get(id(st))
        if cached is None or cached[0] is not env:
            # Not in a read txn: a handle opened in a transaction that is aborted is closed.
            cached = self._meta_dbs[id(st)] = (env, env.open_db(META_DB, create=False))
        return cached[1]

    def foreign(self, shard: int, st: Store, txn: Any) -> ForeignRows | None:
        """The rows a read of ``shard`` in ``txn`` skips (None: none), from the shard's slot
        state in that txn; a newer map than the client's is adopted (the caller routes again
        when ``routes.generation`` moved)."""
        routes = self.routes
        env, tid, generation = st.env, txn.id(), routes.generation
        seen = self._seen.get(shard)
        if seen is not None and seen[1] == tid and seen[0] is env and seen[2] == generation:
            return seen[3]  # the same snapshot as the last read: the same records
        view = self._foreign(shard, st, txn)
        self._seen[shard] = (env, tid, generation, view)
        return view

    def _foreign(self, shard: int, st: Store, txn: Any) -> ForeignRows | None:
        db = self.meta_db(st)
        routes = self.routes
        version, moves = key = RecordedState.key(txn, db)
        if version == routes.version_bytes and moves in (None, NO_MOVES):
            return None
        vkey = (shard, version, moves, routes.generation)
        if vkey in self._views:
            return self._views[vkey]
        recorded = self._recorded.get(shard)
        if recorded is None:
            recorded = self._recorded[shard] = RecordedState(self.config)
        view = shard_view(shard, recorded.state(txn, db, key), routes)
        if len(self._views) > 256:
            self._views.clear()
        self._views[vkey] = view
        return view

    # -- read-your-writes on a replica host --------------------------------------------------

    def note_ack(self, shard: int, copy: str, epoch: int, txn_id: int) -> None:
        """A write to ``shard`` was acked by copy ``copy`` at ``(epoch, txn_id)``: unless that
        is the copy read here (which had it before it acked), reads of the shard must see it
        first. (The point gets' handles in ``ct.local`` are dropped until one has.)"""
        if copy == self.member:
            if self.unseen[shard] is not None:
                self.unseen[shard] = None
            return
        with self._lock:
            before = self.unseen[shard]
            if before is None or (epoch, txn_id) > before:
                self.unseen[shard] = (epoch, txn_id)
        if before is None:
            for ct in self._tables:
                ct.local[shard] = None

    def read(self, shard: int, st: Store) -> Snapshot:
        """A read transaction on ``st`` (this host's copy of ``shard``) that sees this client's
        last ack of the shard, as a context; ReplicaBehind when the copy does not have it
        within ``client.replica_wait``."""
        if self.unseen[shard] is None:
            return st.read()
        return Snapshot(self._caught_up(shard, st))

    def _caught_up(self, shard: int, st: Store) -> ReadTxn:
        waited_until: float | None = None
        while True:
            r = ReadTxn(begin_read(st.env), st.tables)
            have = self._look(shard, st, r)
            if have is None:
                return r
            r.end()
            now = time.monotonic()
            if waited_until is None:
                waited_until = now + self.config.replica_wait
            if now >= waited_until:
                raise self.behind(shard, st, have)
            time.sleep(min(REPLICA_POLL_S, waited_until - now))

    def look(self, shard: int, st: Store) -> tuple[int, int] | None:
        """One look, in a read transaction of its own, whether this host's copy (``st``) has
        the shard's last ack: None when it has (a later read sees it too: the copy only moves
        on), else ``(epoch, txn id)`` of what it has (the async client waits with this)."""
        with st.read() as r:
            return self._look(shard, st, r)

    def _look(self, shard: int, st: Store, r: ReadTxn) -> tuple[int, int] | None:
        ack = self.unseen[shard]
        if ack is None:
            return None
        have = self._has(st, r.txn)
        if have < ack:
            return have
        with self._lock:
            if self.unseen[shard] == ack:
                self.unseen[shard] = None
        return None

    def behind(self, shard: int, st: Store, have: tuple[int, int]) -> ReplicaBehind:
        """The error of a read that waited ``client.replica_wait`` in vain for the copy."""
        ack = self.unseen[shard] or (0, 0)
        return ReplicaBehind(
            f"shard {shard}: this host's copy ({self.member!r}, {st.path}) has not applied "
            f"this client's last write (epoch {ack[0]}, txn {ack[1]}) within "
            f"{self.config.replica_wait:g} s (client.replica_wait); it has epoch {have[0]}, "
            f"txn {have[1]}")

    def _has(self, st: Store, txn: Any) -> tuple[int, int]:
        """``(epoch, txn id)`` of the last primary transaction the copy open in ``st`` has,
        as its meta records say inside ``txn``."""
        state = read_state(_Meta(txn, self.meta_db(st)), self.member)
        if state.role == PRIMARY:
            return state.epoch, int(txn.id())
        return state.applied_epoch, state.applied

    def reset_after_fork(self) -> None:
        """The child's stores reopen their environments; its lock is its own."""
        self._lock = threading.Lock()
        self._meta_dbs = {}

    def close(self) -> None:
        for st in self._stores:
            if st is not None:
                st.close()
        self._stores = [None] * self.config.shards



class RemoteReads:
    """Reads over the wire: through the reader pool when the service runs one
    (``readers.count > 0``), else from the shard's owner (pings and stats always go there)."""

    def __init__(self, config: Config, owners: OwnerConnections) -> None:
        self.config = config
        self.owners = owners
        self._pool: ReaderPool | None = None
        self._lock = threading.Lock()

    def pool(self) -> ReaderPool | None:
        """The reader pool that serves remote reads, or None when the service runs none:
        then the shard owners answer them."""
        if self._pool is None and self.config.readers > 0:
            with self._lock:
                if self._pool is None:
                    self._pool = ReaderPool(self.config, timeout_ms=self.owners.timeout_ms,
                                            retries=self.owners.retries)
        if self._pool is not None and self._pool.shards < self.owners.config.shards:
            self._pool.shards = self.owners.config.shards  # a re-shard added shards
        return self._pool

    def one(self, shard: int, request: Request, map_version: int = 0) -> Any:
        """The reply body of one read (or ping) for one shard, routed by the slot map of
        ``map_version``; raises the Error answered."""
        self.owners.counters.mine()["remote_reads"] += 1
        code, body = request
        pool = self.pool() if code in READ_CODES else None
        if pool is not None:
            return pool.request(shard, code, body, map_version=map_version)
        r = self.owners.request(shard, code, body, write=False, map_version=map_version)
        if isinstance(r, Error):
            raise r
        return r

    def many(self, parts: list[tuple[int, Request]], map_version: int = 0) -> list[Any]:
        """Several reads (shard, request) routed by the slot map of ``map_version``, sent at
        once through the pool (or one owner at a time); their reply bodies in order."""
        pool = self.pool()
        if pool is None:
            return [self.one(shard, request, map_version) for shard, request in parts]
        self.owners.counters.mine()["remote_reads"] += len(parts)
        replies = pool.requests([(shard, code, body) for shard, (code, body) in parts],
                                map_version=map_version)
        for r in replies:
            if isinstance(r, Error):
                raise r
        return replies

    def scan(self, shard: int, table_id: bytes, lo: bytes | None, hi: bytes | None,
             reverse: bool, map_version: int = 0) -> Iterator[tuple[bytes, bytes]]:
        """Encoded (key, value) of one shard with ``lo <= key < hi``, a page at a time,
        routed by the slot map of ``map_version``."""
        pool = self.pool()
        if pool is not None:
            self.owners.counters.mine()["remote_reads"] += 1
            return pool.scan(shard, table_id, lo, hi, reverse, map_version=map_version)
        return paged_scan(lambda body: self.one(shard, (SCAN.code, body), map_version),
                          table_id, lo, hi, reverse)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
