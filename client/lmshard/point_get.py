"""The point get: one row's stored bytes from a fresh LMDB snapshot, the cheapest read there is.

Begin a read transaction, get, abort: no generator, no ``ReadTxn``, a spare transaction handle
reused by py-lmdb. When another process grew the map, ``begin`` raises ``MapResizedError``;
the reader adopts the new size (LMDB's documented answer) and begins again.
"""

from __future__ import annotations

from typing import Any

import lmdb

MAP_RESIZE_RETRIES = 100
"""Times a reader adopts a grown map size in a row before it gives up."""


def begin_read(env: lmdb.Environment, buffers: bool = False) -> Any:
    """A read transaction on ``env``, adopting a map size another process grew."""
    for _ in range(MAP_RESIZE_RETRIES):
        try:
            return env.begin(buffers=buffers)  # type: ignore[call-overload]
        except lmdb.MapResizedError:
            # The writer may grow it again before we begin: adopt as often as it takes.
            env.set_mapsize(0)
    return env.begin(buffers=buffers)  # type: ignore[call-overload]


def point_get(env: lmdb.Environment, db: Any, key: bytes) -> bytes | None:
    """The bytes stored under the encoded ``key`` in database ``db`` of ``env``, or None."""
    try:
        txn = env.begin(db=db)
    except lmdb.MapResizedError:
        txn = begin_read(env)
    data: bytes | None = txn.get(key, db=db)
    txn.abort()
    return data
