"""The ops of a write batch: ``[op code, table id, key, arg]``, checked and applied by the owner.

The client encodes keys and values (the owner stores bytes and decodes values only to maintain
indexes); ``validate_ops`` checks every op of a batch before any is applied, ``apply_ops`` applies
them inside one (nested) write transaction. The checks here are also the read commands' checks
of table ids, keys and range bounds. A put to a table with ttl carries the row as it is stored,
its expiry first (``lmshard.bound_tables``): the client stamps it, the owner keeps the
table's expiry index in step.
"""

from __future__ import annotations

import uuid
from typing import Any

from lmshard.bound_tables import EXPIRY_SIZE
from lmshard.errors import (
    CodecError,
    LimitExceeded,
    ProtocolError,
    TransactionError,
    UnknownTable,
)
from lmshard.keys import MAX_KEY_SIZE
from lmshard.txn import LARGE_VALUE, BoundTable, TableMap, WriteTxn

MAX_OPS_PER_BATCH = 100_000
"""Most ops one write batch may carry."""
MAX_VALUE_SIZE = 16 * 2**20
"""Largest value one op may carry: 16 MiB (LMDB allows more; large blobs belong elsewhere)."""

OP_PUT, OP_DELETE, OP_CAS, OP_INCR, OP_PERSIST = 1, 2, 3, 4, 5
OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CAS: "cas", OP_INCR: "incr",
            OP_PERSIST: "persist"}
CAS_ABSENT, CAS_VALUE, CAS_HASH = 0, 1, 2
"""What a cas op expects: the row absent, the row's encoded value, or its value's hash."""

Op = tuple[int, BoundTable, bytes, Any]
"""A validated op: ``(op code, bound table, key, arg)``."""


def op(code: int, table_id: bytes, key: bytes, arg: Any) -> list[Any]:
    """One op of a write body. (The put paths of ``Batch`` and ``Writer`` inline it.)"""
    return [code, table_id, key, arg]


def cas_arg(value: bytes, expected: bytes | None, expected_hash: bytes | None) -> list[Any]:
    """The arg of a cas op: put ``value`` if the row holds ``expected`` (encoded), or a value
    whose hash is ``expected_hash``, or (both None) if there is no row."""
    if expected_hash is not None:
        return [value, CAS_HASH, bytes(expected_hash)]
    if expected is None:
        return [value, CAS_ABSENT, None]
    return [value, CAS_VALUE, expected]


def incr_delta(delta: Any) -> int:
    """``delta`` for an incr op, checked where the caller writes it (TransactionError)."""
    if type(delta) is not int:
        raise TransactionError(f"incr delta must be an int, not {type(delta).__name__}")
    return delta


def need(cond: bool, what: str) -> None:
    """ProtocolError ``what`` unless ``cond``."""
    if not cond:
        raise ProtocolError(what)


def bound_table(tables: TableMap, tid: Any) -> BoundTable:
    """The table a request names by its 16-byte id."""
    need(type(tid) is bytes and len(tid) == 16, "table id must be 16 bytes (a UUID)")
    b = tables.by_tid.get(tid)
    if b is not None:
        return b
    try:
        found: BoundTable = tables[uuid.UUID(bytes=tid)]
    except UnknownTable:
        raise UnknownTable(
            f"no table with id {uuid.UUID(bytes=tid)} in schema {tables.schema.name!r} "
            "on this shard",
            hint="deploy the same schema to clients and daemon",
        ) from None
    return found


def checked_key(b: BoundTable, kb: Any) -> bytes:
    """``kb`` if it is a key of table ``b`` as its key kind encodes it."""
    if type(kb) is not bytes:
        raise ProtocolError("key must be bytes")
    if not 0 < len(kb) <= MAX_KEY_SIZE:
        raise LimitExceeded(
            f"key of {len(kb)} bytes: LMDB keys are 1..{MAX_KEY_SIZE} bytes (a compile-time "
            "limit of LMDB)",
            hint="hash long keys or use a uint64/uuid surrogate key",
        )
    canonical_key(b, kb)
    return kb


def canonical_key(b: BoundTable, kb: bytes) -> None:
    """The key must be an encoding the table's key kind produces: 3 bytes under a uint64 key
    would decode, but sort and read back wrongly."""
    try:
        canonical = b.kenc(b.kdec(kb)) == kb
    except Exception:
        canonical = False
    if not canonical:
        raise ProtocolError(f"key bytes are not an encoded {b.table.key.spec!r} key")


def checked_value(b: BoundTable, vb: Any) -> bytes:
    """``vb`` if it is a value table ``b``'s codec decodes, within the size limit."""
    if type(vb) is not bytes:
        raise ProtocolError("value must be bytes")
    if len(vb) > MAX_VALUE_SIZE:
        raise LimitExceeded(f"value of {len(vb):,} bytes is over {MAX_VALUE_SIZE:,} bytes")
    if b.expiring and len(vb) < EXPIRY_SIZE:
        raise ProtocolError(f"a row of table {b.name!r} (declared with ttl) starts with its "
                            f"{EXPIRY_SIZE}-byte expiry")
    if not b.indexes:  # with indexes the owner decodes the value anyway, when it applies it
        try:
            b.loads(vb)
        except Exception:
            raise CodecError(
                f"the value for table {b.name!r} does not decode with its codec "
                f"{b.table.value.name!r}; nothing was stored",
                hint="send values encoded by the table's codec",
            ) from None
    return vb


def checked_bound(x: Any) -> bytes | None:
    """A range bound: nil, or bytes no longer than a key."""
    if x is None or (type(x) is bytes and len(x) <= MAX_KEY_SIZE):
        return x
    raise ProtocolError("range bound must be bytes")


def _checked_arg(code: int, b: BoundTable, arg: Any) -> Any:
    """The arg of an op other than a put, checked for its op code."""
    if code == OP_DELETE:
        need(arg is None, "delete takes no argument")
    elif code == OP_INCR:
        need(type(arg) is int and -(2**63) <= arg < 2**63, "incr delta must be an int64")
    elif code == OP_PERSIST:
        need(arg is None, "persist takes no argument")
        b.check_expiring("persist")
    elif code == OP_CAS:
        need(type(arg) is list and len(arg) == 3, "cas arg is [value, kind, expected]")
        value, kind, expected = arg
        checked_value(b, value)
        need(kind in (CAS_ABSENT, CAS_VALUE, CAS_HASH), "cas kind must be 0, 1 or 2")
        need(kind == CAS_ABSENT or type(expected) is bytes, "cas expectation must be bytes")
    else:
        raise ProtocolError(f"unknown op code {code!r:.20}")
    return arg


def validate_ops(tables: TableMap, ops: Any, max_ops: int = MAX_OPS_PER_BATCH) -> list[Op]:
    """Check every op of a write batch before any is applied.

    The owner's hottest loop: the common case (a put of a known table) is checked inline, every
    unusual case falls through to the helpers that build the precise error.
    """
    need(type(ops) is list, "a write body is an array of ops")
    if len(ops) > max_ops:
        raise LimitExceeded(f"batch of {len(ops):,} ops is over the limit of {max_ops:,}")
    by_tid = tables.by_tid
    out: list[Op] = []
    append = out.append
    for o in ops:
        need(type(o) is list and len(o) == 4, "an op is [code, table id, key, arg]")
        code, tid, kb, arg = o
        b = by_tid.get(tid) if type(tid) is bytes else None
        if b is None:
            b = bound_table(tables, tid)
        if type(kb) is not bytes or not 0 < len(kb) <= MAX_KEY_SIZE:
            kb = checked_key(b, kb)
        else:
            width = b.any_width
            if width is None or (width and len(kb) != width):
                canonical_key(b, kb)
        append((code, b, kb, checked_value(b, arg) if code == OP_PUT
                else _checked_arg(code, b, arg)))
    return out


def apply_ops(w: WriteTxn, ops: list[Op]) -> list[Any]:
    """Apply validated ops inside one (nested) write transaction; per-op results. When ``w``
    records its changes (``WriteTxn.log``), what the batch changed is there, as the change log
    records it: an increment as the put of its result, a compare-and-set as its put, a delete
    only when there was a row (to a table with ttl: a stored row, expired or not)."""
    results: list[Any] = []
    append = results.append
    txn = w.txn  # the plain put of an index-free table, inlined below
    log = w.log
    for code, b, kb, arg in ops:
        if code == OP_PUT:
            if b.indexes or b.expiring or len(arg) >= LARGE_VALUE:
                w.put_raw(b.table, kb, arg)
            else:
                txn.put(kb, arg, db=b.db)
                if log is not None:
                    log.append((b.tid, kb, arg))
            append(None)
        elif code == OP_DELETE:
            append(w.delete_raw(b.table, kb))
        elif code == OP_INCR:
            append(w.incr_raw(b.table, kb, arg))
        elif code == OP_PERSIST:
            append(w.persist_raw(b.table, kb))
        else:
            value, kind, expected = arg
            append(w.cas_raw(
                b.table, kb, value,
                expected if kind == CAS_VALUE else None,
                expected if kind == CAS_HASH else None,
            ))
    return results
