"""The point get: one row's stored bytes from a fresh LMDB snapshot, the cheapest read there is.

Begin a read transaction, get, abort: no generator, no ``ReadTxn``, a spare transaction handle
reused by py-lmdb. When another process grew the map, ``begin`` raises ``MapResizedError``;
the reader adopts the new size (``map_growth.begin_read``) and begins again.
"""

from __future__ import annotations

from typing import Any

import lmdb

from lmshard.map_growth import begin_read


def point_get(env: lmdb.Environment, db: Any, key: bytes) -> bytes | None:
    """The bytes stored under the encoded ``key`` in database ``db`` of ``env``, or None."""
    try:
        txn = env.begin(db=db)
    except lmdb.MapResizedError:
        txn = begin_read(env)
    data: bytes | None = txn.get(key, db=db)
    txn.abort()
    return data
