"""The data API every lmshard front end offers, as a ``typing.Protocol``.

The embedded ``Store`` and the daemon ``Client`` read and write tables with the same calls, so
code written against ``DataAPI`` runs against either of them (``AsyncDataAPI`` is the same API
with ``await``, offered by ``lmshard.aio.AsyncClient``):

    def record_login(db: lmshard.DataAPI, user_id: uuid.UUID) -> None:
        db.incr("logins", user_id)

A table is named by its ``Table``, its name or its UUID (``TableRef``). ``batch()`` groups
writes: on the store one write transaction, on the client one message per shard (atomic per
shard); what its write methods return differs (the store's ``WriteTxn`` answers at once, the
client's ``Batch`` after the block), so ``BatchWrites`` declares only that they are called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from lmshard.txn import TableRef
from lmshard.watch import Watch


class BatchWrites(Protocol):
    """The writes inside a ``batch()`` block."""

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None
            ) -> object: ...

    def delete(self, table: TableRef, key: Any) -> object: ...

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> object: ...


class DataAPI(Protocol):
    """Reads and writes of typed tables: what ``Store`` and ``Client`` both offer."""

    def get(self, table: TableRef, key: Any, default: Any = None) -> Any:
        """The value under ``key``, or ``default``."""

    def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]:
        """Values for several keys in order, ``default`` where a key is missing."""

    def exists(self, table: TableRef, key: Any) -> bool: ...

    def scan(self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None,
             reverse: bool = False, limit: int | None = None,
             where: Callable[[Any], bool] | None = None) -> Iterator[tuple[Any, Any]]:
        """(key, value) in key order; ``start`` inclusive, ``end`` exclusive."""

    def count(self, table: TableRef, prefix: Any = None, start: Any = None,
              end: Any = None) -> int: ...

    def lookup(self, table: TableRef, index: str, value: Any, prefix: bool = False
               ) -> list[tuple[Any, Any]]:
        """Rows by index value (or index value prefix), in key order."""

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value``; on a table declared with ttl it expires ``ttl`` seconds from now
        (None: the table's default). TTLError for a bad ttl or a table without ttl."""

    def delete(self, table: TableRef, key: Any) -> bool:
        """Whether a row was there."""

    def ttl(self, table: TableRef, key: Any) -> float | None:
        """Seconds until the row expires; None when it never does, 0.0 when there is no row
        (or it expired)."""

    def persist(self, table: TableRef, key: Any) -> bool:
        """Make the row never expire; whether it had an expiry to remove."""

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> int:
        """Atomically add ``delta``; the new value."""

    def cas(self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
            expected_hash: bytes | None = None) -> bool:
        """Put ``value`` only if the row holds ``expected`` (None: absent)."""

    def batch(self) -> AbstractContextManager[BatchWrites]:
        """Writes grouped and applied together (see the module docstring)."""

    def watch(self, table: TableRef | None = None, *, prefix: Any = None,
              since: str | None = None) -> Watch:
        """The changes committed after the call ("now"), from the oldest kept ("start"), or
        after a stored ``Watch.cursor`` (``lmshard.watch``)."""


class AsyncBatchWrites(BatchWrites, Protocol):
    """An async ``batch()``: the same writes, sent at the end of ``async with``."""

    async def __aenter__(self) -> AsyncBatchWrites: ...

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...


class AsyncDataAPI(Protocol):
    """``DataAPI`` with ``await``: what ``lmshard.aio.AsyncClient`` offers, call for call (a
    scan is an async iterator, a watch is awaited and then iterated with ``async for``)."""

    async def get(self, table: TableRef, key: Any, default: Any = None) -> Any: ...

    async def get_many(self, table: TableRef, keys: Any, default: Any = None) -> list[Any]: ...

    async def exists(self, table: TableRef, key: Any) -> bool: ...

    def scan(self, table: TableRef, prefix: Any = None, start: Any = None, end: Any = None,
             reverse: bool = False, limit: int | None = None,
             where: Callable[[Any], bool] | None = None) -> AsyncIterator[tuple[Any, Any]]: ...

    async def count(self, table: TableRef, prefix: Any = None, start: Any = None,
                    end: Any = None) -> int: ...

    async def lookup(self, table: TableRef, index: str, value: Any, prefix: bool = False
                     ) -> list[tuple[Any, Any]]: ...

    async def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None
                  ) -> None: ...

    async def ttl(self, table: TableRef, key: Any) -> float | None: ...

    async def persist(self, table: TableRef, key: Any) -> bool: ...

    async def delete(self, table: TableRef, key: Any) -> bool: ...

    async def incr(self, table: TableRef, key: Any, delta: int = 1) -> int: ...

    async def cas(self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
                  expected_hash: bytes | None = None) -> bool: ...

    def batch(self) -> AsyncBatchWrites: ...
