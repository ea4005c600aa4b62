"""The point get: one row's stored bytes from a fresh LMDB snapshot, the cheapest read there is.

Begin a read transaction, get, abort: no generator, no ``ReadTxn``, a spare transaction handle
reused by py-lmdb. When another process grew the map, ``begin`` raises ``MapResizedError``;
the reader adopts the new size (``map_growth.begin_read``) and begins again.

The shard's slot map version (meta record ``slot_map_version``) is read in the same snapshot
and compared, as bytes, with the version the client routes by: when they differ (a re-shard
moved on), the answer is ``SLOTS_CHANGED`` and the client reads the row the careful way
(``LocalShards.row``: the shard's map adopted if newer, its foreign slots skipped).

``unique_lookup`` is the same read for a unique index of a table that lives on one shard: the
index entry and the row it names, two gets in one snapshot (``lookup``'s common case).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lmdb

from lmshard.index_values import encode_index_value
from lmshard.map_growth import begin_read
from lmshard.slot_state import META_VERSION

if TYPE_CHECKING:
    from lmshard.client_tables import ClientTable
    from lmshard.reads import LocalShards

SLOTS_CHANGED: Any = object()
"""``point_get``'s answer when the shard records another slot map version than expected."""
_EXPIRED: Any = object()


def point_get(env: lmdb.Environment, db: Any, key: bytes) -> bytes | None:
    """The bytes stored under the encoded ``key`` in database ``db`` of ``env``, or None."""
    try:
        txn = env.begin(db=db)
    except lmdb.MapResizedError:
        txn = begin_read(env)
        data: bytes | None = txn.get(key, None, db)
        txn.abort()
        return data
    data = txn.get(key)  # the transaction's own database: no argument to parse (~80 ns)
    txn.abort()
    return data


def routed_get(env: lmdb.Environment, db: Any, key: bytes, meta: Any, version: bytes,
               seen: list[tuple[int, bytes]]) -> Any:
    """``point_get`` of a client: SLOTS_CHANGED instead when the shard's ``slot_map_version``
    (in meta database ``meta``, same snapshot) is not ``version``, the client's.

    ``seen[0]`` is the (snapshot txn id, version) last found to match: a read of the same
    snapshot skips the check (a get in a second named database of the transaction, which LMDB
    first looks up in the main database: about 220 ns; the txn id and a compare: about 50).
    One tuple, replaced whole, so threads sharing it never pair an id with another version."""
    try:
        txn = env.begin(db=db)
    except lmdb.MapResizedError:
        txn = begin_read(env)
        data = txn.get(key, None, db) if txn.get(META_VERSION, None, meta) == version \
            else SLOTS_CHANGED
        txn.abort()
        return data
    tid = txn.id()
    last = seen[0]
    if (last[0] != tid or last[1] is not version) and not _same_map(txn, meta, version, seen):
        txn.abort()
        return SLOTS_CHANGED
    data = txn.get(key)
    txn.abort()
    return data


def unique_lookup(local: LocalShards, ct: ClientTable, index: str, value: Any) -> Any:
    """``lookup`` of one value of a unique index of a table that lives on one shard open in
    this process (``route.only``): the index entry and the row it names, two gets in one
    snapshot, the slot map version checked as ``routed_get`` does; None when the read must go
    the careful way (``calls.Lookup``: another table, index or shard, a newer slot map, a map
    another process grew, a read that must wait for an ack)."""
    version = local.routes.version_bytes  # before routing: a newer map is never assumed
    shard = ct.route.only
    if shard is None:
        return None
    hit = ct.local[shard]
    if hit is None:
        hit = local.handles(ct, shard)
        if hit is None:
            return None
    ixdb = hit[4].get(index)
    if ixdb is None:
        return None
    ivb = encode_index_value(value)
    try:
        txn = hit[0].begin(db=ixdb)
    except lmdb.MapResizedError:
        return None
    seen = hit[3]
    last = seen[0]
    if (last[0] != txn.id() or last[1] is not version) and not _same_map(
            txn, hit[2], version, seen):
        txn.abort()
        return None
    rk = txn.get(ivb)
    data = None if rk is None else txn.get(rk, None, hit[1])
    txn.abort()
    if data is None:
        return []
    if not ct.expiring:
        return [(ct.kdec(rk), ct.loads(data))]
    v = ct.value(data, _EXPIRED)
    return [] if v is _EXPIRED else [(ct.kdec(rk), v)]


def _same_map(txn: Any, meta: Any, version: bytes, seen: list[tuple[int, bytes]]) -> bool:
    """Whether snapshot ``txn`` records slot map ``version``; remembered in ``seen`` if so."""
    if txn.get(META_VERSION, None, meta) != version:
        return False
    seen[0] = (txn.id(), version)
    return True
