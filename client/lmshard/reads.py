"""Where a client's reads are served: this process's read-only maps, or over the wire.

On the owners' host a client opens each shard's environment read-only, once per process, on
first use (``LocalShards``); reads there are plain LMDB reads, no IPC. A shard whose files cannot
be opened here (another host, ``local_reads = false``) is read over the wire (``RemoteReads``):
through the reader pool when the service runs one, else from the shard's owner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from lmshard.client_tables import ClientTable
from lmshard.config import Config
from lmshard.connections import OwnerConnections
from lmshard.errors import Error
from lmshard.protocol import READ_CODES, SCAN, paged_scan
from lmshard.remote import ReaderPool
from lmshard.schema import Schema
from lmshard.store import Store

log = logging.getLogger("lmshard.client")

Request = tuple[int, Any]
"""A request's (command code, body), built by its command (``Command.request_for``)."""


class LocalShards:
    """The shards' environments opened read-only in this process; None for a shard read over
    the wire."""

    def __init__(self, config: Config, schema: Schema, *, enabled: bool) -> None:
        self.config = config
        self.schema = schema
        self.enabled = enabled
        self._stores: list[Store | None] = [None] * config.shards
        self._remote_only: set[int] = set()
        self._lock = threading.Lock()

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
        path = self.config.shard_dir(shard)
        try:
            st = Store(path, self.schema, readonly=True, max_readers=self.config.max_readers)
        except Error as exc:
            log.warning("shard %d: reading through the owner, the files at %s cannot "
                        "be opened here: %s", shard, path, exc)
            self._remote_only.add(shard)
            return None
        self._stores[shard] = st
        return st

    def handles(self, ct: ClientTable, shard: int) -> tuple[Any, Any] | None:
        """(environment, database) of table ``ct`` on ``shard`` when the shard is open here,
        kept in ``ct.local`` for the point gets that follow; None: read over the wire."""
        st = self.get(shard)
        if st is None:
            return None
        hit = ct.local[shard] = (st.env, st.tables[ct.table].db)
        return hit

    def reset_after_fork(self) -> None:
        """The child's stores reopen their environments; its lock is its own."""
        self._lock = threading.Lock()

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
        return self._pool

    def one(self, shard: int, request: Request) -> Any:
        """The reply body of one read (or ping) for one shard; raises the Error answered."""
        self.owners.counters.mine()["remote_reads"] += 1
        code, body = request
        pool = self.pool() if code in READ_CODES else None
        if pool is not None:
            return pool.request(shard, code, body)
        r = self.owners.request(shard, code, body, write=False)
        if isinstance(r, Error):
            raise r
        return r

    def many(self, parts: list[tuple[int, Request]]) -> list[Any]:
        """Several reads (shard, request), sent at once through the pool (or one owner at a
        time); their reply bodies in order."""
        pool = self.pool()
        if pool is None:
            return [self.one(shard, request) for shard, request in parts]
        self.owners.counters.mine()["remote_reads"] += len(parts)
        replies = pool.requests([(shard, code, body) for shard, (code, body) in parts])
        for r in replies:
            if isinstance(r, Error):
                raise r
        return replies

    def scan(self, shard: int, table_id: bytes, lo: bytes | None, hi: bytes | None,
             reverse: bool) -> Iterator[tuple[bytes, bytes]]:
        """Encoded (key, value) of one shard with ``lo <= key < hi``, a page at a time."""
        pool = self.pool()
        if pool is not None:
            self.owners.counters.mine()["remote_reads"] += 1
            return pool.scan(shard, table_id, lo, hi, reverse)
        return paged_scan(lambda body: self.one(shard, (SCAN.code, body)),
                          table_id, lo, hi, reverse)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
