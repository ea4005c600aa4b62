"""Living with LMDB's fixed-size memory map: growing it when full, adopting another's growth.

An LMDB environment's map has a size; a write past it fails with ``MapFullError``. The writer
grows the map between transactions (``grow_map``: doubling, up to a cap), and the store's write
transaction (``ReplayingWriteTxn``) replays its writes on the bigger map, so a block of writes
never sees the error. A process that finds the map grown by another (``MapResizedError`` when it
begins a read) adopts the new size (``begin_read``).

The map is address space, not disk (set_mapsize only maps more; LMDB truncates the file to the
map size with MDB_WRITEMAP alone, which lmshard does not use), so a commit may find the
filesystem full although the map has room. The disk fills while LMDB writes or syncs the
transaction's pages, before the meta page that would make them visible: LMDB aborts the
transaction and the environment stays usable. ``disk_full`` turns that error into ``DiskFull``;
the next commit simply tries again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any

import lmdb

from lmshard.bound_tables import BoundRef, TableMap
from lmshard.changes import ChangeLog
from lmshard.errors import DiskFull, StoreFull, TransactionError
from lmshard.txn import ENDED, WriteTxn

log = logging.getLogger("lmshard.store")

MAP_RESIZE_RETRIES = 100
"""Times a reader adopts a grown map size in a row before it gives up."""
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Errnos of a filesystem that refuses more blocks: no space left, or the quota used up."""
SHORT_WRITE_FREE_BYTES = 2**20
"""An EIO counts as a full disk when less than this is left free (1 MiB): LMDB reports a write
cut short by the filesystem filling up as EIO, not ENOSPC."""


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


def disk_full(exc: lmdb.Error, path: str, store: str) -> DiskFull | None:
    """The DiskFull that ``exc``, raised by LMDB committing to the store at ``path``, means;
    None when it means something else. ``store`` names the store in the message (``shard 3``)."""
    code = getattr(exc, "code", 0)
    free = free_bytes(path)
    short_write = code == errno.EIO and free is not None and free < SHORT_WRITE_FREE_BYTES
    if code not in NO_SPACE_ERRNOS and not short_write:
        return None
    cause = f"{exc}: a write cut short by the full disk" if short_write else str(exc)
    left = "unknown" if free is None else f"{free:,} bytes"
    return DiskFull(
        f"{store} takes no writes while the filesystem of {path} is full ({cause}; "
        f"{left} free); nothing of this write was stored"
    )


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged process may still write on the filesystem of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def begin_read(env: lmdb.Environment, buffers: bool = False) -> Any:
    """A read transaction on ``env``, adopting the map size another process grew it to."""
    for _ in range(MAP_RESIZE_RETRIES):
        try:
            return env.begin(buffers=buffers)  # type: ignore[call-overload]
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size (LMDB's documented answer). The
            # writer may grow it again before we begin, so adopt as often as it takes.
            env.set_mapsize(0)
    return env.begin(buffers=buffers)  # type: ignore[call-overload]


_NO_KW: dict[str, Any] = {}
_Op = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ReplayingWriteTxn(WriteTxn):
    """A write transaction that survives MapFullError: grow the map, replay, carry on.

    Use it as a context manager: it commits when the block ends, and aborts (changing nothing)
    when the block raises.
    """

    __slots__ = ("_env", "_max_map_size", "_path", "_ops", "_done", "_changes")

    def __init__(
        self, env: lmdb.Environment, tables: TableMap, max_map_size: int, path: str,
        strict: bool, changes: ChangeLog | None = None,
    ) -> None:
        log: list[Any] | None = [] if changes is not None and changes.enabled else None
        super().__init__(env.begin(write=True), tables, strict=strict, log=log)
        self._changes = changes if log is not None else None
        self._env = env
        self._max_map_size = max_map_size
        self._path = path
        self._ops: list[_Op] = []
        self._done = False

    def __enter__(self) -> ReplayingWriteTxn:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException:
            self._abort()
            raise

    def _grow_and_replay(self) -> None:
        self._txn.abort()
        grow_map(self._env, self._max_map_size, self._path)
        self._txn = self._env.begin(write=True)
        if self._log is not None:
            self._log.clear()  # the replay logs every change again
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

    def put(self, table: BoundRef, key: Any, value: Any, ttl: float | None = None) -> None:
        # The hot path of batched inserts: no generic dispatch, one frame down to LMDB.
        if self._done:
            raise TransactionError("this transaction has ended")
        b = self._tables[table]
        if b.expiring or ttl is not None:  # stamped once: a replay keeps the expiry
            vb = b.dumps(value) if ttl is None else b.encode(value, ttl)
            self._record(WriteTxn.put_raw, (b, b.kenc(key), vb), {})
            return
        try:
            WriteTxn.put(self, table, key, value)
        except lmdb.MapFullError:
            self._grow_and_replay()
            self._retrying(WriteTxn.put, (table, key, value), {})
        self._ops.append((WriteTxn.put, (table, key, value), _NO_KW))

    def put_raw(self, *args: Any, **kw: Any) -> None:
        self._record(WriteTxn.put_raw, args, kw)

    def delete(self, *args: Any, **kw: Any) -> bool:
        result: bool = self._record(WriteTxn.delete, args, kw)
        return result

    def delete_raw(self, *args: Any, **kw: Any) -> bool:
        result: bool = self._record(WriteTxn.delete_raw, args, kw)
        return result

    def incr(self, *args: Any, **kw: Any) -> int:
        result: int = self._record(WriteTxn.incr, args, kw)
        return result

    def cas(self, *args: Any, **kw: Any) -> bool:
        result: bool = self._record(WriteTxn.cas, args, kw)
        return result

    def purge(self, *args: Any, **kw: Any) -> int:
        result: int = self._record(WriteTxn.purge, args, kw)
        return result

    def persist(self, *args: Any, **kw: Any) -> bool:
        result: bool = self._record(WriteTxn.persist, args, kw)
        return result

    def persist_raw(self, *args: Any, **kw: Any) -> bool:
        result: bool = self._record(WriteTxn.persist_raw, args, kw)
        return result

    def expire(self, *args: Any, **kw: Any) -> int:
        result: int = self._record(WriteTxn.expire, args, kw)
        return result

    def _commit(self) -> None:
        self._done = True
        while True:
            try:
                if self._changes is not None and self._log:
                    self._changes.append(self._txn, self._txn.id(), self._log)
                self._txn.commit()
                break
            except lmdb.MapFullError:
                self._grow_and_replay()
            except lmdb.Error as exc:
                full = disk_full(exc, self._path, "this store")
                if full is None:
                    raise
                raise full from exc
        self._txn = ENDED

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._txn.abort()
        self._txn = ENDED
