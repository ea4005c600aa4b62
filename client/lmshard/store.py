"""The embedded store: lmshard's table layer over one LMDB environment, in one process.

``lmshard.open(path, schema)`` gives the same data API the daemon client exposes, so code moves
between the two. One process writes; other processes may open the same path read-only.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2
import lmdb

from lmshard.errors import (
    Error,
    ReadOnlyError,
    SchemaError,
    SchemaMismatch,
    StoreFull,
    TransactionError,
)
from lmshard.forksafe import forget_inherited
from lmshard.schema import Schema
from lmshard.txn import ENDED, ReadTxn, TableMap, TableRef, WriteTxn, bind_tables

log = logging.getLogger("lmshard.store")

DEFAULT_MAP_SIZE = 64 * 2**20
"""Initial LMDB map size: 64 MiB; the writer doubles it when full."""
DEFAULT_MAX_MAP_SIZE = 8 * 2**30
"""The cap for map growth: 8 GiB; past it writes raise StoreFull."""
MAX_DBS = 256
"""Named databases per environment (tables + indexes + meta); the same in every process."""
DEFAULT_MAX_READERS = 126
"""LMDB's reader slots; each thread holding a read transaction uses one."""
DEFAULT_SLOW_TXN_WARNING = 1.0
"""Seconds a write transaction may stay open before a warning is logged."""
SPARE_TXNS = 4
"""Read transaction handles py-lmdb keeps for reuse, which makes a read per call cheap."""
MAP_RESIZE_RETRIES = 100
"""Times a reader adopts a grown map size in a row before it gives up."""
META_DB = b"__lmshard__"
FORMAT_VERSION = 1

_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # LMDB environments must not be used across fork(): the child drops the inherited handle
    # without closing it (see lmshard.forksafe) and reopens on first use.
    for store in list(_open_stores):
        if store._env is not None:
            forget_inherited(store._env)
            store._env = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def grow_map(env: lmdb.Environment, max_map_size: int, path: str) -> int:
    """Double the map size up to ``max_map_size``; StoreFull once the cap is reached.

    Call only with no transaction of this process open on ``env``.
    """
    current = env.info()["map_size"]
    if current >= max_map_size:
        raise StoreFull(
            f"the store at {path} is full: map size {current:,} bytes reached "
            f"max_map_size {max_map_size:,} bytes; nothing of this write was stored"
        )
    new = min(current * 2, max_map_size)
    env.set_mapsize(new)
    log.info("grew map of %s from %d to %d bytes", path, current, new)
    return new



def read_meta(path: str | os.PathLike[str]) -> dict[bytes, bytes] | None:
    """The records a store at ``path`` keeps about itself (format, schema, tables), read
    without changing anything; None if there is no store there yet."""
    if not Path(path, "data.mdb").is_file():
        return None
    env = lmdb.open(os.fspath(path), readonly=True, lock=False, max_dbs=MAX_DBS, subdir=True)
    try:
        with env.begin() as txn:
            try:
                meta_db = env.open_db(META_DB, txn=txn, create=False)
            except lmdb.NotFoundError:
                return {}
            return dict(txn.cursor(db=meta_db).iternext())
    finally:
        env.close()


def check_stored_schema(schema: Schema, meta: dict[bytes, bytes], path: Any) -> int:
    """Refuse a store whose records (``read_meta``) conflict with ``schema``: another format or
    schema name, a newer schema version, a table created with other key or value types. The
    stored schema version (``schema.version`` for a new store)."""
    fmt = meta.get(b"format")
    if fmt is not None and int(fmt) != FORMAT_VERSION:
        raise SchemaMismatch(
            f"the store at {path} has format {fmt.decode()}, this lmshard reads "
            f"format {FORMAT_VERSION}"
        )
    stored = cbor2.loads(meta[b"schema"]) if b"schema" in meta else None
    if stored is not None and stored["name"] != schema.name:
        raise SchemaMismatch(
            f"the store at {path} belongs to schema {stored['name']!r}, not {schema.name!r}",
            hint="open it with its own schema, or use another path",
        )
    version: int = stored["version"] if stored else schema.version
    if version > schema.version:
        raise SchemaMismatch(
            f"the store at {path} is at schema version {version}, newer than this "
            f"code's version {schema.version}",
            hint="run the newer code, or restore a backup taken before the upgrade",
        )
    for t in schema.tables.values():
        mkey = b"table/" + str(t.table_id).encode()
        if mkey not in meta:
            continue
        record = cbor2.loads(meta[mkey])
        declared = {"key": _spec(t.key.spec), "value": t.value.name}
        for what in ("key", "value"):
            if record[what] != declared[what]:
                raise SchemaMismatch(
                    f"table {t.name!r} ({t.table_id}) was created with {what} "
                    f"{record[what]!r}, the schema now declares {declared[what]!r}"
                )
    return version


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
        self._env: lmdb.Environment | None = None
        self._tables: TableMap = TableMap(schema, [])
        self._closed = False
        self._open_env()
        _open_stores.add(self)

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
        if self.readonly:
            self._tables = self._bind_readonly(env)
        else:
            self._tables = self._prepare(env)
        self._env = env
        return env

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
                w = WriteTxn(txn, tables)
                self._check_and_record(env, txn, meta_db, meta, w)
                if self._on_open is not None:
                    self._on_open(txn, meta_db, meta)
                txn.commit()
                return tables
            except lmdb.MapFullError:
                txn.abort()
                grow_map(env, self.max_map_size, self.path)
            except BaseException:
                txn.abort()
                raise

    def _check_and_record(
        self, env: lmdb.Environment, txn: lmdb.Transaction, meta_db: Any,
        meta: dict[bytes, bytes], w: WriteTxn,
    ) -> None:
        schema = self.schema
        version = check_stored_schema(schema, meta, self.path)
        for t in schema.tables.values():
            mkey = b"table/" + str(t.table_id).encode()
            record = cbor2.loads(meta[mkey]) if mkey in meta else None
            declared = {"key": _spec(t.key.spec), "value": t.value.name}
            built = record.get("indexes", {}) if record else {}
            for ix in t.indexes.values():
                flags = {"unique": ix.unique, "nullable": ix.nullable}
                if built.get(ix.name) != flags:
                    self._build_index(w, t.name, ix.name)
            for gone in set(built) - set(t.indexes):
                log.warning("index %s.%s is no longer declared: dropping it", t.name, gone)
                name = b"i/" + str(t.table_id).encode() + b"/" + gone.encode()
                txn.drop(env.open_db(name, txn=txn, dupsort=not built[gone]["unique"]))
            record = dict(declared, name=t.name, placement=t.placement, indexes={
                ix.name: {"unique": ix.unique, "nullable": ix.nullable}
                for ix in t.indexes.values()
            })
            txn.put(mkey, cbor2.dumps(record), db=meta_db)
        for v in range(version, schema.version):
            migrate = schema.migrations.get(v)
            if migrate is None:
                raise SchemaError(
                    f"no migration from schema version {v} to {v + 1}",
                    hint=f"declare one with @schema.migration({v})",
                )
            log.info("migrating %s from schema version %d to %d", self.path, v, v + 1)
            migrate(w)
        txn.put(b"format", str(FORMAT_VERSION).encode(), db=meta_db)
        txn.put(
            b"schema", cbor2.dumps({"name": schema.name, "version": schema.version}), db=meta_db
        )

    @staticmethod
    def _build_index(w: WriteTxn, table: str, index: str) -> None:
        b = w._tables[table]
        bi = b.index(index)
        w._txn.drop(bi.db, delete=False)
        rows = int(w._txn.stat(b.db)["entries"])
        if rows:
            log.info("building index %s.%s over %d rows", table, index, rows)
        for kb, vb in w.scan_raw(table):
            value = b.loads(vb)
            ivb = bi.encode(value)
            if ivb is None:
                continue
            if bi.unique:
                if not w._txn.put(ivb, kb, db=bi.db, overwrite=False):
                    from lmshard.errors import UniqueViolation

                    raise UniqueViolation(
                        f"cannot build unique index {table}.{index}: two rows share a value"
                    )
            else:
                w._txn.put(ivb, kb, db=bi.db)

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment, reopened after a fork."""
        return self._env or self._open_env()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        self._closed = True
        _open_stores.discard(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else "writable"
        return f"<lmshard.Store {self.path} {mode} schema={self.schema.name}>"

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[ReadTxn]:
        """A read snapshot. With ``buffers=True`` values are decoded straight from the map
        (zero-copy; lazy FlatBuffers objects stay valid only inside the block)."""
        txn = _begin_read(self._env or self._open_env(), buffers)
        r = ReadTxn(txn, self._tables)
        try:
            yield r
        finally:
            txn.abort()
            r._txn = ENDED

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
    def _writing(self, strict: bool) -> Iterator[WriteTxn]:
        if self.readonly:
            raise ReadOnlyError(f"the store at {self.path} is open read-only")
        env = self._env or self._open_env()
        started = time.monotonic()
        w = _ReplayingWriteTxn(self, env, strict)
        try:
            yield w
            w._commit()
        except BaseException:
            w._abort()
            raise
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
        b = self._tables[table]
        env = self._env or self._open_env()
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            txn = _begin_read(env)
        data = txn.get(b.kenc(key), db=b.db)
        txn.abort()
        return default if data is None else b.loads(data)

    def get_encoded(self, table: TableRef, key_bytes: bytes, default: Any = None) -> Any:
        """``get`` for an already encoded key (the client's routed read path)."""
        b = self._tables[table]
        env = self._env or self._open_env()
        try:
            txn = env.begin()
        except lmdb.MapResizedError:
            txn = _begin_read(env)
        data = txn.get(key_bytes, db=b.db)
        txn.abort()
        return default if data is None else b.loads(data)

    def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        with self.read() as r:
            return r.get_many(table, keys, default)

    def exists(self, table: TableRef, key: Any) -> bool:
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
        with self.read() as r:
            return r.lookup(table, index, value, prefix)

    def count(
        self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None
    ) -> int:
        with self.read() as r:
            return r.count(table, prefix, start, end)

    def marshal(self, table: TableRef, key: Any) -> dict[str, Any] | None:
        with self.read() as r:
            return r.marshal(table, key)

    def put(self, table: TableRef, key: Any, value: Any) -> None:
        with self._writing(strict=False) as w:
            w.put(table, key, value)

    def delete(self, table: TableRef, key: Any) -> bool:
        with self._writing(strict=False) as w:
            return w.delete(table, key)

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        with self._writing(strict=False) as w:
            return w.incr(table, key, delta)

    def cas(
        self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
        expected_hash: bytes | None = None,
    ) -> bool:
        with self._writing(strict=False) as w:
            return w.cas(table, key, value, expected, expected_hash=expected_hash)

    def purge(self, table: TableRef) -> int:
        with self._writing(strict=False) as w:
            return w.purge(table)

    def stats(self) -> dict[str, Any]:
        """Per table rows and bytes; for the environment map size and use, readers, txn id."""
        env = self._env or self._open_env()
        info = env.info()
        st = env.stat()
        psize = st["psize"]
        tables: dict[str, Any] = {}
        with self.read() as r:
            txn = r._txn
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
    return (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * psize


def _spec(spec: Any) -> Any:
    return list(spec) if isinstance(spec, tuple) else spec


def _begin_read(env: lmdb.Environment, buffers: bool = False) -> Any:
    for _ in range(MAP_RESIZE_RETRIES):
        try:
            return env.begin(buffers=buffers)  # type: ignore[call-overload]
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size (LMDB's documented answer). The
            # writer may grow it again before we begin, so adopt as often as it takes.
            env.set_mapsize(0)
    return env.begin(buffers=buffers)  # type: ignore[call-overload]


_NO_KW: dict[str, Any] = {}


class _ReplayingWriteTxn(WriteTxn):
    """A write transaction that survives MapFullError: grow the map, replay, carry on."""

    __slots__ = ("_store", "_env", "_ops", "_done")

    def __init__(self, store: Store, env: lmdb.Environment, strict: bool) -> None:
        super().__init__(env.begin(write=True), store._tables, strict=strict)
        self._store = store
        self._env = env
        self._ops: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self._done = False

    def _grow_and_replay(self) -> None:
        self._txn.abort()
        grow_map(self._env, self._store.max_map_size, self._store.path)
        self._txn = self._env.begin(write=True)
        for fn, args, kwargs in self._ops:
            self._retrying(fn, args, kwargs)

    def _retrying(self, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        while True:
            try:
                return fn(self, *args, **kw)
            except lmdb.MapFullError:
                self._grow_and_replay()

    def _record(self, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if self._done:
            raise TransactionError("this transaction has ended")
        result = self._retrying(fn, args, kw)
        self._ops.append((fn, args, kw))
        return result

    def put(self, table: TableRef, key: Any, value: Any) -> None:
        # The hot path of batched inserts: no generic dispatch, one frame down to LMDB.
        if self._done:
            raise TransactionError("this transaction has ended")
        try:
            WriteTxn._put(self, table, key, value)
        except lmdb.MapFullError:
            self._grow_and_replay()
            self._retrying(WriteTxn._put, (table, key, value), {})
        self._ops.append((WriteTxn._put, (table, key, value), _NO_KW))

    def put_raw(self, *args: Any, **kw: Any) -> None:
        return self._record(WriteTxn.put_raw, args, kw)

    def delete(self, *args: Any, **kw: Any) -> bool:
        return self._record(WriteTxn.delete, args, kw)

    def delete_raw(self, *args: Any, **kw: Any) -> bool:
        return self._record(WriteTxn.delete_raw, args, kw)

    def incr(self, *args: Any, **kw: Any) -> int:
        return self._record(WriteTxn.incr, args, kw)

    def cas(self, *args: Any, **kw: Any) -> bool:
        return self._record(WriteTxn.cas, args, kw)

    def purge(self, *args: Any, **kw: Any) -> int:
        return self._record(WriteTxn.purge, args, kw)

    def _commit(self) -> None:
        self._done = True
        while True:
            try:
                self._txn.commit()
                break
            except lmdb.MapFullError:
                self._grow_and_replay()
        self._txn = ENDED

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._txn.abort()
        self._txn = ENDED


def open(path: str | os.PathLike[str], schema: Schema, **options: Any) -> Store:  # noqa: A001
    """Open (creating if needed) an embedded store at ``path`` for ``schema``.

    Options: readonly, map_size, max_map_size, sync, metasync, max_readers, create,
    slow_txn_warning. Use it as a context manager or call ``close()``.
    """
    return Store(path, schema, **options)
