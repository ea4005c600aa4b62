"""The embedded store: lmshard's table layer over one LMDB environment, in one process.

``lmshard.open(path, schema)`` gives the same data API the daemon client exposes, so code moves
between the two. One process writes; other processes may open the same path read-only.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from lmshard.bound_tables import TableMap, TableRef, bind_tables
from lmshard.changes import DEFAULT_RETAIN, DEFAULT_RETAIN_SECONDS, ChangeLog
from lmshard.errors import Error, ReadOnlyError, SchemaError, TransactionError
from lmshard.forksafe import check_fork, forget_inherited, on_fork_in_child
from lmshard.map_growth import MAP_RESIZE_RETRIES, ReplayingWriteTxn, begin_read, grow_map
from lmshard.point_get import point_get
from lmshard.schema import Schema
from lmshard.store_meta import (
    FORMAT_VERSION,
    MAX_DBS,
    META_DB,
    check_stored_schema,
    read_meta,
    record_schema,
)
from lmshard.txn import EXPIRE_STEP, ReadTxn, Snapshot, WriteTxn
from lmshard.watch import StoreWatch, watch_filter

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MAX_MAP_SIZE",
    "DEFAULT_MAX_READERS",
    "DEFAULT_SLOW_TXN_WARNING",
    "SPARE_TXNS",
    "Store",
    "open",
    # Homes elsewhere, importable from here as they always were: the store's records about
    # itself (lmshard.store_meta) and map growth (lmshard.map_growth).
    "FORMAT_VERSION",
    "MAX_DBS",
    "META_DB",
    "check_stored_schema",
    "grow_map",
    "read_meta",
]

log = logging.getLogger("lmshard.store")

DEFAULT_MAP_SIZE = 64 * 2**20
"""Initial LMDB map size: 64 MiB; the writer doubles it when full."""
DEFAULT_MAX_MAP_SIZE = 8 * 2**30
"""The cap for map growth: 8 GiB; past it writes raise StoreFull."""
DEFAULT_MAX_READERS = 126
"""LMDB's reader slots; each thread holding a read transaction uses one."""
DEFAULT_SLOW_TXN_WARNING = 1.0
"""Seconds a write transaction may stay open before a warning is logged."""
SPARE_TXNS = 4
"""Read transaction handles py-lmdb keeps for reuse, which makes a read per call cheap."""
WRITE_EXPIRE_STEP = 100
"""Expired rows each write transaction of a store with ttl tables deletes before it commits
(the embedded store has no owner to sweep them; ``Store.expire()`` deletes all at once)."""


def allocate_lock_file(path: Path) -> None:
    """Give every page of LMDB's lock file its blocks now (call it before this process opens
    the environment: see ``Store._allocate_lock_file``). The file is sparse, and a reader
    taking a slot on a page never written needs a block then: on a full filesystem that
    process would die of SIGBUS. Linux's fallocate(2) reserves blocks without writing (never
    glibc's posix_fallocate, whose fallback on filesystems without fallocate writes zeros,
    over the slots of live readers); where it is missing nothing is done. A failure is
    logged, never fatal: the store works, only that protection is missing."""
    fallocate = _fallocate()
    if fallocate is None:
        return
    try:
        fd = os.open(path / "lock.mdb", os.O_RDWR)
    except OSError:
        return
    try:
        if fallocate(fd, 0, 0, os.fstat(fd).st_size) != 0:
            err = ctypes.get_errno()
            log.warning("cannot allocate the lock file of %s (%s): on a full disk a process "
                        "taking a reader slot may be killed by SIGBUS", path, os.strerror(err))
    finally:
        os.close(fd)


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2), or None where there is none (not Linux)."""
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


class Store:
    """An open embedded store. Use ``lmshard.open()``; close it, or use it as a context manager."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: Schema,
        *,
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        sync: bool = True,
        metasync: bool = True,
        max_readers: int = DEFAULT_MAX_READERS,
        create: bool = True,
        slow_txn_warning: float = DEFAULT_SLOW_TXN_WARNING,
        on_open: Callable[[lmdb.Transaction, Any, dict[bytes, bytes]], None] | None = None,
        changes: bool = False,
        changes_retain: int = DEFAULT_RETAIN,
        changes_retain_seconds: float = DEFAULT_RETAIN_SECONDS,
    ) -> None:
        if not isinstance(schema, Schema):
            raise SchemaError(
                f"open() needs an lmshard.Schema, got {type(schema).__name__}",
                hint="pass the Schema your tables are declared on",
            )
        if map_size > max_map_size:
            raise Error(
                f"map_size {map_size:,} is larger than max_map_size {max_map_size:,}",
                hint="raise max_map_size or lower map_size",
            )
        self.path = str(path)
        self.schema = schema
        self.readonly = readonly
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.sync = sync
        self.metasync = metasync
        self.max_readers = max_readers
        self.create = create
        self.slow_txn_warning = slow_txn_warning
        self._on_open = on_open
        self.changes_enabled = changes
        self.changes_retain = changes_retain
        self.changes_retain_seconds = changes_retain_seconds
        self.changes: ChangeLog | None = None
        """The change log (``lmshard.changes``); None until the environment is open."""
        self._env: lmdb.Environment | None = None
        self._tables: TableMap = TableMap(schema, [])
        self._closed = False
        self._open_env()
        on_fork_in_child(self._forget_inherited_env)

    # -- opening ---------------------------------------------------------------------------

    def _open_env(self) -> lmdb.Environment:
        if self._closed:
            raise TransactionError(f"the store at {self.path} is closed", hint="open it again")
        if not self.readonly and self.create:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        elif not Path(self.path, "data.mdb").exists():
            raise Error(
                f"no lmshard store at {self.path}",
                hint="check the path, or open it writable once to create it",
            )
        if not self.readonly:
            self._allocate_lock_file()
        try:
            env = lmdb.open(
                self.path,
                map_size=self.map_size,
                max_dbs=MAX_DBS,
                readonly=self.readonly,
                sync=self.sync,
                metasync=self.metasync,
                max_readers=self.max_readers,
                max_spare_txns=SPARE_TXNS,
                create=self.create and not self.readonly,
                lock=True,
            )
        except lmdb.Error as exc:
            raise Error(
                f"cannot open the LMDB environment at {self.path}: {exc}",
                hint="check the path and its permissions; a read-only open needs the store "
                "to exist",
            ) from exc
        self.changes = ChangeLog(env, retain=self.changes_retain,
                                 retain_seconds=self.changes_retain_seconds)
        if self.readonly:
            self._tables = self._bind_readonly(env)
            self.changes.attach_readonly()
        else:
            self._tables = self._prepare(env)
        self._env = env
        return env

    def _allocate_lock_file(self) -> None:
        """``allocate_lock_file`` before this process opens the environment: closing a file
        descriptor of the lock file drops every POSIX lock the process holds on it, LMDB's
        included, so it must happen while the process holds none. A new store's lock file
        is made by opening the environment once."""
        path = Path(self.path)
        if not (path / "lock.mdb").exists():
            if not self.create:
                return
            lmdb.open(self.path, map_size=self.map_size, max_dbs=MAX_DBS,
                      max_readers=self.max_readers, lock=True).close()
        allocate_lock_file(path)

    def _bind_readonly(self, env: lmdb.Environment) -> TableMap:
        def open_db(name: bytes, dupsort: bool) -> Any:
            for _ in range(MAP_RESIZE_RETRIES):
                try:
                    return env.open_db(name, dupsort=dupsort, create=False)
                except lmdb.MapResizedError:
                    env.set_mapsize(0)
                except lmdb.NotFoundError:
                    break
            try:
                return env.open_db(name, dupsort=dupsort, create=False)
            except lmdb.NotFoundError:
                raise SchemaError(
                    f"the store at {self.path} has no database for {name.decode()}",
                    hint="the writer creates tables when it opens the store with this "
                    "schema; open it writable (or start the owner) first",
                ) from None

        return bind_tables(self.schema, open_db)

    def _prepare(self, env: lmdb.Environment) -> TableMap:
        """Create databases, check and record the schema, run migrations, build new indexes."""
        while True:
            txn = env.begin(write=True)
            try:
                meta_db = env.open_db(META_DB, txn=txn)
                meta = dict(txn.cursor(db=meta_db).iternext())
                tables = bind_tables(self.schema, _db_opener(env, txn))
                record_schema(WriteTxn(txn, tables), env, meta_db, meta, self.schema, self.path)
                if self._on_open is not None:
                    self._on_open(txn, meta_db, meta)
                assert self.changes is not None
                self.changes.open(txn, meta_db, meta, self.changes_enabled)
                txn.commit()
                return tables
            except lmdb.MapFullError:
                txn.abort()
                grow_map(env, self.max_map_size, self.path)
            except BaseException:
                txn.abort()
                raise

    def _forget_inherited_env(self) -> None:
        # LMDB environments must not be used across fork(): the child drops the inherited handle
        # without closing it (see lmshard.forksafe) and reopens on first use.
        if self._env is not None:
            forget_inherited(self._env)
            self._env = None

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment, reopened after a fork."""
        return self._env or self._open_env()

    @property
    def tables(self) -> TableMap:
        """The schema's tables bound to this store's environment (database handles, encoders)."""
        return self._tables

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def close(self) -> None:
        """Close the environment; the store cannot be used afterwards."""
        if self._env is not None:
            self._env.close()
            self._env = None
        self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else "writable"
        return f"<lmshard.Store {self.path} {mode} schema={self.schema.name}>"

    # -- transactions ----------------------------------------------------------------------

    def read(self, buffers: bool = False) -> Snapshot:
        """A read snapshot, as a context. With ``buffers=True`` values are decoded straight
        from the map (zero-copy; lazy FlatBuffers objects stay valid only inside the block)."""
        check_fork()
        return Snapshot(ReadTxn(begin_read(self._env or self._open_env(), buffers),
                                self._tables))

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """A write transaction: commits when the block ends, changes nothing on an exception.

        When the map fills up it is grown and the transaction's writes are replayed, so the
        block never sees MapFullError; past ``max_map_size`` it raises StoreFull.
        """
        with self._writing(strict=False) as w:
            yield w

    @contextmanager
    def batch(self) -> Iterator[WriteTxn]:
        """An atomic group of writes; a failed compare-and-set fails the whole batch."""
        with self._writing(strict=True) as w:
            yield w

    @contextmanager
    def _writing(self, strict: bool, sweep: bool = True) -> Iterator[WriteTxn]:
        if self.readonly:
            raise ReadOnlyError(f"the store at {self.path} is open read-only")
        check_fork()
        env = self._env or self._open_env()
        started = time.monotonic()
        w = ReplayingWriteTxn(env, self._tables, self.max_map_size, self.path, strict,
                              self.changes)
        try:
            with w:
                yield w
                if sweep and self._tables.expiring:
                    w.expire(WRITE_EXPIRE_STEP)
        finally:
            held = time.monotonic() - started
            if held > self.slow_txn_warning:
                log.warning(
                    "a write transaction on %s was held open for %.2fs (warning at %.2fs): "
                    "keep write transactions short, do slow work before opening one",
                    self.path, held, self.slow_txn_warning,
                )

    # -- the data API ----------------------------------------------------------------------

    def get(self, table: TableRef, key: Any, default: Any = None) -> Any:
        """The value under ``key`` or ``default``; reads its own fresh snapshot."""
        check_fork()
        env = self._env or self._open_env()  # first: reopening (after a fork) rebinds the tables
        b = self._tables[table]
        data = point_get(env, b.db, b.kenc(key))
        if b.expiring:
            return b.value(data, default)
        return default if data is None else b.loads(data)

    def get_encoded(self, table: TableRef, key_bytes: bytes, default: Any = None) -> Any:
        """``get`` for an already encoded key (the client's routed read path)."""
        check_fork()
        env = self._env or self._open_env()
        b = self._tables[table]
        data = point_get(env, b.db, key_bytes)
        if b.expiring:
            return b.value(data, default)
        return default if data is None else b.loads(data)

    def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        """Values for several keys in order, from one snapshot; ``default`` where missing."""
        with self.read() as r:
            return r.get_many(table, keys, default)

    def exists(self, table: TableRef, key: Any) -> bool:
        """Whether a row is stored under ``key``."""
        with self.read() as r:
            return r.exists(table, key)

    def scan(
        self,
        table: TableRef,
        prefix: Any = None,
        start: Any = None,
        end: Any = None,
        reverse: bool = False,
        limit: int | None = None,
        where: Callable[[Any], bool] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Yield (key, value) in key order from one snapshot held while iterating."""
        with self.read() as r:
            yield from r.scan(table, prefix, start, end, reverse, limit, where)

    def lookup(
        self, table: TableRef, index: str, value: Any, prefix: bool = False
    ) -> list[tuple[Any, Any]]:
        """Rows whose index value equals ``value`` (or, with ``prefix``, starts with it)."""
        with self.read() as r:
            return r.lookup(table, index, value, prefix)

    def count(
        self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None
    ) -> int:
        """Rows in the table, or in a key range or prefix."""
        with self.read() as r:
            return r.count(table, prefix, start, end)

    def marshal(self, table: TableRef, key: Any) -> dict[str, Any] | None:
        """A JSON-safe view of one row and its index values, for debugging; None if missing."""
        with self.read() as r:
            return r.marshal(table, key)

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` in its own write transaction; on a table with ttl
        it expires ``ttl`` seconds from now (None: the table's default)."""
        with self._writing(strict=False) as w:
            w.put(table, key, value, ttl)

    def ttl(self, table: TableRef, key: Any) -> float | None:
        """Seconds until the row expires; None when it never does, 0.0 when there is no row."""
        with self.read() as r:
            return r.ttl(table, key)

    def persist(self, table: TableRef, key: Any) -> bool:
        """Make the row never expire; whether it had an expiry to remove."""
        with self._writing(strict=False) as w:
            return w.persist(table, key)

    def expire(self) -> int:
        """Delete every expired row now (a write transaction per ``EXPIRE_STEP`` rows); the
        number deleted. Reads never return expired rows, and each write transaction deletes
        a few as it commits: this reclaims the space of the rest at once."""
        total = 0
        while self._tables.expiring:
            with self._writing(strict=False, sweep=False) as w:
                n = w.expire(EXPIRE_STEP)
            total += n
            if n < EXPIRE_STEP:
                break
        return total

    def delete(self, table: TableRef, key: Any) -> bool:
        """Remove the row under ``key``; False if there was none."""
        with self._writing(strict=False) as w:
            return w.delete(table, key)

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        """Add ``delta`` to the integer under ``key`` (missing counts as 0); the new value."""
        with self._writing(strict=False) as w:
            return w.incr(table, key, delta)

    def cas(
        self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
        expected_hash: bytes | None = None,
    ) -> bool:
        """Put ``value`` only if the row holds ``expected`` (None: absent), or stored bytes
        with ``expected_hash``; False otherwise."""
        with self._writing(strict=False) as w:
            return w.cas(table, key, value, expected, expected_hash=expected_hash)

    def purge(self, table: TableRef) -> int:
        """Drop every row and index entry of a table; the number of rows dropped."""
        with self._writing(strict=False) as w:
            return w.purge(table)

    def watch(self, table: TableRef | None = None, *, prefix: Any = None,
              since: str | None = None) -> StoreWatch:
        """Follow this store's change log (open the store with ``changes=True``): every change
        committed after the call (``since=None`` or "now"), from the oldest kept ("start"), or
        after a ``Watch.cursor`` stored earlier. See ``lmshard.watch``."""
        self._env or self._open_env()
        tids, pb = watch_filter(self._tables, table, prefix)
        return StoreWatch(self, None if tids is None else frozenset(tids), pb, since)

    def stats(self) -> dict[str, Any]:
        """Per table rows and bytes; for the environment map size and use, readers, txn id."""
        env = self._env or self._open_env()
        info = env.info()
        st = env.stat()
        psize = st["psize"]
        tables: dict[str, Any] = {}
        with self.read() as r:
            txn = r.txn
            for t in self.schema.tables.values():
                b = self._tables[t]
                s = txn.stat(b.db)
                tables[t.name] = {
                    "table_id": str(t.table_id),
                    "rows": s["entries"],
                    "bytes": _db_bytes(s, psize),
                    "indexes": {
                        bi.name: {
                            "entries": txn.stat(bi.db)["entries"],
                            "bytes": _db_bytes(txn.stat(bi.db), psize),
                        }
                        for bi in b.indexes
                    },
                }
        return {
            "env": {
                "path": self.path,
                "map_size": info["map_size"],
                "map_used": (info["last_pgno"] + 1) * psize,
                "max_map_size": self.max_map_size,
                "page_size": psize,
                "last_txnid": info["last_txnid"],
                "readers": info["num_readers"],
                "max_readers": info["max_readers"],
            },
            "tables": tables,
        }


def _db_opener(env: lmdb.Environment, txn: lmdb.Transaction) -> Callable[[bytes, bool], Any]:
    return lambda name, dupsort: env.open_db(name, txn=txn, dupsort=dupsort)


def _db_bytes(s: Any, psize: int) -> int:
    return int(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * psize


def open(path: str | os.PathLike[str], schema: Schema, **options: Any) -> Store:  # noqa: A001
    """Open (creating if needed) an embedded store at ``path`` for ``schema``.

    Options: readonly, map_size, max_map_size, sync, metasync, max_readers, create,
    slow_txn_warning; changes=True keeps a change log (``Store.watch``), bounded by
    changes_retain (bytes) and changes_retain_seconds. Use it as a context manager or call
    ``close()``.
    """
    return Store(path, schema, **options)
