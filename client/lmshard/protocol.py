"""The wire protocol between clients and shard owners: one registry, both sides.

Every frame is a version byte followed by one msgpack array.

- request: ``[command code, client id (16 bytes or nil), sequence number, body]``
- reply:   ``[sequence number, status, body]``; status 0 is success, any other value is an
  error code from ``lmshard.errors`` and the body is ``[message, hint]``.

Each ``Command`` holds the client's body builder, the owner's validation and its handler, and
its docstring is the specification; ``docs/protocol.md`` is generated from this registry
(``python -m lmshard.protocol``). Keys and values travel encoded (the client runs the key
encoding and the codec; the owner stores bytes and decodes values only to maintain indexes).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from lmshard.errors import (
    CodecError,
    Error,
    LimitExceeded,
    ProtocolError,
    UnknownTable,
    error_classes,
)
from lmshard.keys import MAX_KEY_SIZE
from lmshard.txn import LARGE_VALUE, ReadTxn, TableMap, WriteTxn, prefix_end

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of the frame layout."""
VERSION_BYTE = bytes([PROTOCOL_VERSION])
MAX_FRAME_SIZE = 64 * 2**20
"""Largest frame an owner decodes: 64 MiB."""
MAX_OPS_PER_BATCH = 100_000
"""Most ops one write batch may carry."""
MAX_VALUE_SIZE = 16 * 2**20
"""Largest value one op may carry: 16 MiB (LMDB allows more; large blobs belong elsewhere)."""
MAX_SCAN_PAGE = 10_000
"""Most rows one scan reply carries; the client asks again from the next key."""

ZERO_COPY_MIN = 4 * 2**20
"""Frames from this size on are sent without a copy. Below it a copy is cheaper: sending a
batch of 1,000 rows (about 110 KiB) with a copy took 10-15% less client CPU than pyzmq's
zero-copy send, whose buffer release runs through a separate thread."""

PIPELINE_WINDOW = 8
"""Most batches a pipelined writer keeps in flight per shard; the owner keeps this many replies
per stream, so a batch resent after a lost connection is answered as it was the first time."""

OP_PUT, OP_DELETE, OP_CAS, OP_INCR = 1, 2, 3, 4
OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CAS: "cas", OP_INCR: "incr"}
CAS_ABSENT, CAS_VALUE, CAS_HASH = 0, 1, 2

_packb = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb


def pack_request(code: int, client_id: bytes | None, seq: int, body: Any) -> bytes:
    return VERSION_BYTE + _packb([code, client_id, seq, body])


def pack_reply(seq: int, status: int, body: Any) -> bytes:
    return VERSION_BYTE + _packb([seq, status, body])


def pack_error(seq: int, err: Error) -> bytes:
    return pack_reply(seq, err.code, [err.message, err.hint])


def unpack_frame(frame: bytes, max_size: int = MAX_FRAME_SIZE) -> list[Any]:
    """Check the version byte and size, decode the msgpack array; ProtocolError otherwise."""
    if len(frame) > max_size:
        raise LimitExceeded(
            f"frame of {len(frame):,} bytes is over the limit of {max_size:,} bytes"
        )
    if not frame:
        raise ProtocolError("empty frame")
    if frame[0] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {frame[0]} is not supported (this side speaks "
            f"{PROTOCOL_VERSION})",
            hint="run the same lmshard version on clients and daemon",
        )
    try:
        msg = _unpackb(memoryview(frame)[1:], raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(msg, list):
        raise ProtocolError(f"a frame must hold an array, not {type(msg).__name__}")
    return msg


def unpack_request(frame: bytes, max_size: int = MAX_FRAME_SIZE) -> tuple[int, Any, int, Any]:
    """``(code, client_id, seq, body)``; the seq is 0 when it cannot be read."""
    msg = unpack_frame(frame, max_size)
    if len(msg) != 4:
        raise ProtocolError(f"a request has 4 fields, this one {len(msg)}")
    code, client_id, seq, body = msg
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise ProtocolError(f"sequence number must be a non-negative int, not {seq!r:.40}")
    if type(code) is not int:
        raise ProtocolError(f"command code must be an int, not {code!r:.40}")
    if client_id is not None and (type(client_id) is not bytes or len(client_id) != 16):
        raise ProtocolError("client id must be 16 bytes or nil")
    return code, client_id, seq, body


# -- validation helpers -------------------------------------------------------------------------


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _table(tables: TableMap, tid: Any) -> Any:
    _need(type(tid) is bytes and len(tid) == 16, "table id must be 16 bytes (a UUID)")
    b = tables.by_tid.get(tid)
    if b is not None:
        return b
    try:
        return tables[uuid.UUID(bytes=tid)]
    except UnknownTable:
        raise UnknownTable(
            f"no table with id {uuid.UUID(bytes=tid)} in schema {tables.schema.name!r} "
            "on this shard",
            hint="deploy the same schema to clients and daemon",
        ) from None


def _key(b: Any, kb: Any) -> bytes:
    _need(type(kb) is bytes, "key must be bytes")
    if not 0 < len(kb) <= MAX_KEY_SIZE:
        raise LimitExceeded(
            f"key of {len(kb)} bytes: LMDB keys are 1..{MAX_KEY_SIZE} bytes (a compile-time "
            "limit of LMDB)",
            hint="hash long keys or use a uint64/uuid surrogate key",
        )
    _canonical_key(b, kb)
    return kb


def _canonical_key(b: Any, kb: bytes) -> None:
    """The key must be an encoding the table's key kind produces: 3 bytes under a uint64 key
    would decode, but sort and read back wrongly."""
    try:
        canonical = b.kenc(b.kdec(kb)) == kb
    except Exception:
        canonical = False
    if not canonical:
        raise ProtocolError(f"key bytes are not an encoded {b.table.key.spec!r} key")


def _value(b: Any, vb: Any) -> bytes:
    if type(vb) is not bytes:
        raise ProtocolError("value must be bytes")
    if len(vb) > MAX_VALUE_SIZE:
        raise LimitExceeded(f"value of {len(vb):,} bytes is over {MAX_VALUE_SIZE:,} bytes")
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


def _bound(b: Any, x: Any) -> bytes | None:
    _need(x is None or (type(x) is bytes and len(x) <= MAX_KEY_SIZE), "range bound must be bytes")
    return x


def validate_ops(tables: TableMap, ops: Any, max_ops: int = MAX_OPS_PER_BATCH) -> list[tuple]:
    """Check every op of a write batch before any is applied: ``(op, bound table, key, arg)``.

    The owner's hottest loop: the common case (a put of a known table) is checked inline, every
    unusual case falls through to the helpers that build the precise error.
    """
    _need(type(ops) is list, "a write body is an array of ops")
    if len(ops) > max_ops:
        raise LimitExceeded(f"batch of {len(ops):,} ops is over the limit of {max_ops:,}")
    by_tid = tables.by_tid
    out: list[tuple] = []
    append = out.append
    for op in ops:
        _need(type(op) is list and len(op) == 4, "an op is [code, table id, key, arg]")
        code, tid, kb, arg = op
        b = by_tid.get(tid) if type(tid) is bytes else None
        if b is None:
            b = _table(tables, tid)
        if type(kb) is not bytes or not 0 < len(kb) <= MAX_KEY_SIZE:
            kb = _key(b, kb)
        else:
            width = b.any_width
            if width is None or (width and len(kb) != width):
                _canonical_key(b, kb)
        if code == OP_PUT:
            arg = _value(b, arg)
        elif code == OP_DELETE:
            _need(arg is None, "delete takes no argument")
        elif code == OP_INCR:
            _need(type(arg) is int and -(2**63) <= arg < 2**63, "incr delta must be an int64")
        elif code == OP_CAS:
            _need(type(arg) is list and len(arg) == 3, "cas arg is [value, kind, expected]")
            value, kind, expected = arg
            _value(b, value)
            _need(kind in (CAS_ABSENT, CAS_VALUE, CAS_HASH), "cas kind must be 0, 1 or 2")
            _need(kind == CAS_ABSENT or type(expected) is bytes, "cas expectation must be bytes")
        else:
            raise ProtocolError(f"unknown op code {code!r:.20}")
        append((code, b, kb, arg))
    return out


def apply_ops(w: WriteTxn, ops: list[tuple]) -> list[Any]:
    """Apply validated ops inside one (nested) write transaction; per-op results."""
    results: list[Any] = []
    append = results.append
    txn = w._txn  # noqa: SLF001 - the plain put of an index-free table, inlined below
    for code, b, kb, arg in ops:
        if code == OP_PUT:
            if b.indexes or len(arg) >= LARGE_VALUE:
                w.put_raw(b, kb, arg)
            else:
                txn.put(kb, arg, db=b.db)
            append(None)
        elif code == OP_DELETE:
            results.append(w.delete_raw(b, kb))
        elif code == OP_INCR:
            results.append(w.incr_raw(b, kb, arg))
        else:
            value, kind, expected = arg
            results.append(w.cas_raw(
                b, kb, value,
                expected if kind == CAS_VALUE else None,
                expected if kind == CAS_HASH else None,
            ))
    return results


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One wire command: its code, the client's body builder, the owner's validation and
    handler. ``writes`` commands go through group commit; the others run in a read txn."""

    name: str
    code: int
    request: str
    reply: str
    doc: str
    build: Callable[..., Any]
    validate: Callable[[TableMap, Any], Any]
    handle: Callable[[Any, Any], Any] | None
    writes: bool = False


COMMANDS: dict[str, Command] = {}
BY_CODE: dict[int, Command] = {}


def command(
    name: str, code: int, *, request: str, reply: str, writes: bool = False,
    validate: Callable[[TableMap, Any], Any],
    handle: Callable[[Any, Any], Any] | None = None,
) -> Callable[[Callable[..., Any]], Command]:
    """Register a command; the decorated function is its client-side body builder and its
    docstring is the spec."""

    def register(build: Callable[..., Any]) -> Command:
        cmd = Command(name, code, request, reply, (build.__doc__ or "").strip(), build,
                      validate, handle, writes)
        assert name not in COMMANDS and code not in BY_CODE, name
        COMMANDS[name] = cmd
        BY_CODE[code] = cmd
        return cmd

    return register


def _no_body(tables: TableMap, body: Any) -> None:
    _need(body is None, "this command takes no body")


@command("ping", 1, request="nil", reply="map: shard, pid, txn_id, map_size, map_used, uptime",
         validate=_no_body)
def ping() -> None:
    """Liveness and health: answered by the owner's loop between commits, so a reply also
    proves the loop is not stuck. The owner fills in the reply itself."""
    return None


def _v_write(tables: TableMap, body: Any) -> list[tuple]:
    return validate_ops(tables, body)


class OrderedOps(list):
    """The validated ops of a pipelined batch and the sequence number it must follow."""

    __slots__ = ("after",)

    def __init__(self, ops: list[tuple], after: int) -> None:
        super().__init__(ops)
        self.after = after


def _v_write_after(tables: TableMap, body: Any) -> OrderedOps:
    _need(type(body) is list and len(body) == 2, "a pipelined write body is [after, ops]")
    after, ops = body
    _need(type(after) is int and 0 <= after < 2**63, "after must be a sequence number")
    return OrderedOps(validate_ops(tables, ops), after)


def stored_reply(status: int, body: Any) -> Any:
    """A write's reply body as the owner keeps it for retries: all-nil results as a count."""
    if status == 0 and type(body) is list and len(body) == 2 and type(body[1]) is list \
            and body[1].count(None) == len(body[1]):
        return [body[0], len(body[1])]
    return body


def replayed_reply(status: int, body: Any) -> Any:
    """The reply body ``stored_reply`` kept, as it was first sent."""
    if status == 0 and type(body) is list and len(body) == 2 and type(body[1]) is int:
        return [body[0], [None] * body[1]]
    return body


@command("write", 2, request="[[op, table id, key, arg], ...]",
         reply="[txn id, [result per op]]", writes=True, validate=_v_write)
def write(ops: list[list[Any]]) -> list[list[Any]]:
    """An atomic batch of ops for one shard, applied once per (client id, sequence number).

    Ops: ``put`` (1, arg = value bytes), ``delete`` (2, arg nil; result: whether a row was
    there), ``cas`` (3, arg = [value, kind, expected]: kind 0 the row must be absent, 1 the row
    must hold a value equal to ``expected`` (encoded), 2 ``expected`` is the value's 16-byte
    BLAKE2b hash; result true; a mismatch fails the batch with ConflictError), ``incr``
    (4, arg = int64 delta; result: the new value). The owner commits many batches in one LMDB
    transaction (group commit), each in a nested transaction, so a failing batch fails alone.
    The reply carries the shard's txn id the batch committed in. A retried batch (same client id
    and sequence number) is answered from the shard's meta table and not applied again."""
    return ops


@command("write_after", 3, request="[after, [[op, table id, key, arg], ...]]",
         reply="[txn id, [result per op]]", writes=True, validate=_v_write_after)
def write_after(after: int, ops: list[list[Any]]) -> list[Any]:
    """A batch of a pipelined stream: like ``write``, and applied only right after the batch
    with sequence number ``after`` from the same client id (0: the stream's first batch).

    A client keeps up to PIPELINE_WINDOW (8) batches in flight per shard on one connection, so
    they arrive in order. If one is lost with a broken connection, the next is refused with
    OutOfOrder (64) and nothing of it is applied; the client resends its unacknowledged batches
    oldest first. The owner keeps the replies of the stream's last 8 batches in its meta table,
    so a resent batch that was applied is answered again, not applied twice. A client id is
    required."""
    return [after, ops]


def _v_get(tables: TableMap, body: Any) -> tuple[Any, bytes]:
    _need(type(body) is list and len(body) == 2, "get body is [table id, key]")
    b = _table(tables, body[0])
    return b, _key(b, body[1])


def _h_get(r: ReadTxn, args: tuple[Any, bytes]) -> bytes | None:
    return r.get_raw(args[0], args[1])


@command("get", 10, request="[table id, key]", reply="value bytes or nil",
         validate=_v_get, handle=_h_get)
def get(table_id: bytes, key: bytes) -> list[Any]:
    """One row's stored value, for clients that cannot map the shard's files."""
    return [table_id, key]


def _v_get_many(tables: TableMap, body: Any) -> tuple[Any, list[bytes]]:
    _need(type(body) is list and len(body) == 2 and type(body[1]) is list,
          "get_many body is [table id, [key, ...]]")
    b = _table(tables, body[0])
    if len(body[1]) > MAX_OPS_PER_BATCH:
        raise LimitExceeded(f"get_many of {len(body[1]):,} keys is over {MAX_OPS_PER_BATCH:,}")
    return b, [_key(b, k) for k in body[1]]


def _h_get_many(r: ReadTxn, args: tuple[Any, list[bytes]]) -> list[bytes | None]:
    b, keys = args
    return [r.get_raw(b, k) for k in keys]


@command("get_many", 11, request="[table id, [key, ...]]", reply="[value bytes or nil, ...]",
         validate=_v_get_many, handle=_h_get_many)
def get_many(table_id: bytes, keys: list[bytes]) -> list[Any]:
    """Several rows of one table from one snapshot, in request order."""
    return [table_id, keys]


def _v_scan(tables: TableMap, body: Any) -> tuple[Any, Any, Any, bool, int]:
    _need(type(body) is list and len(body) == 5, "scan body is [table id, lo, hi, reverse, limit]")
    b = _table(tables, body[0])
    _need(type(body[3]) is bool, "reverse must be a bool")
    _need(type(body[4]) is int and 0 < body[4] <= MAX_SCAN_PAGE,
          f"scan page limit must be 1..{MAX_SCAN_PAGE}")
    return b, _bound(b, body[1]), _bound(b, body[2]), body[3], body[4]


def _h_scan(r: ReadTxn, args: tuple[Any, Any, Any, bool, int]) -> list[Any]:
    b, lo, hi, reverse, limit = args
    items: list[list[bytes]] = []
    for kv in r.scan_raw(b, lo, hi, reverse):
        if len(items) == limit:
            return [items, True]
        items.append(list(kv))
    return [items, False]


@command("scan", 12, request="[table id, lo, hi, reverse, page limit]",
         reply="[[[key, value], ...], more]", validate=_v_scan, handle=_h_scan)
def scan(table_id: bytes, lo: bytes | None, hi: bytes | None, reverse: bool,
         limit: int) -> list[Any]:
    """One page of rows with ``lo <= key < hi`` in key order (or reverse). ``more`` is true
    when rows remain; the client asks again from just past the last key it got."""
    return [table_id, lo, hi, reverse, limit]


def _v_lookup(tables: TableMap, body: Any) -> tuple[Any, str, bytes, bool]:
    _need(type(body) is list and len(body) == 4, "lookup body is [table id, index, value, prefix]")
    b = _table(tables, body[0])
    _need(type(body[1]) is str, "index name must be a string")
    b.index(body[1])
    _need(type(body[2]) is bytes and len(body[2]) <= MAX_KEY_SIZE
          and (len(body[2]) > 0 or body[3] is True),
          f"index value must be 1..{MAX_KEY_SIZE} bytes (empty only as a prefix)")
    _need(type(body[3]) is bool, "prefix must be a bool")
    return b, body[1], body[2], body[3]


def _h_lookup(r: ReadTxn, args: tuple[Any, str, bytes, bool]) -> list[list[bytes]]:
    b, index, ivb, prefix = args
    out = []
    for rk in r.lookup_keys_raw(b, index, ivb, prefix):
        data = r.get_raw(b, rk)
        if data is not None:
            out.append([rk, data])
    return out


@command("lookup", 13, request="[table id, index name, encoded index value, prefix]",
         reply="[[key, value], ...]", validate=_v_lookup, handle=_h_lookup)
def lookup(table_id: bytes, index: str, value: bytes, prefix: bool) -> list[Any]:
    """Rows whose index value equals the encoded value (or starts with it, ``prefix``)."""
    return [table_id, index, value, prefix]


def _v_count(tables: TableMap, body: Any) -> tuple[Any, Any, Any]:
    _need(type(body) is list and len(body) == 3, "count body is [table id, lo, hi]")
    b = _table(tables, body[0])
    return b, _bound(b, body[1]), _bound(b, body[2])


def _h_count(r: ReadTxn, args: tuple[Any, Any, Any]) -> int:
    b, lo, hi = args
    if lo is None and hi is None:
        return r.count(b)
    return sum(1 for _ in r.scan_raw(b, lo, hi))


@command("count", 14, request="[table id, lo, hi]", reply="int",
         validate=_v_count, handle=_h_count)
def count(table_id: bytes, lo: bytes | None, hi: bytes | None) -> list[Any]:
    """Rows of a table, or of the key range ``lo <= key < hi``."""
    return [table_id, lo, hi]


READ_COMMANDS = ("get", "get_many", "scan", "lookup", "count")
"""The read commands the reader pool serves inside ``read``."""


def _v_read(tables: TableMap, body: Any) -> tuple[int, Command, Any]:
    """The envelope only: the reader pool checks the shard and runs the inner validate."""
    _need(type(body) is list and len(body) == 3, "a read body is [shard, command code, body]")
    shard, code, inner = body
    _need(type(shard) is int and shard >= 0, "shard must be a non-negative int")
    cmd = BY_CODE.get(code) if type(code) is int else None
    _need(cmd is not None and cmd.name in READ_COMMANDS,
          f"read carries one of {', '.join(READ_COMMANDS)}")
    assert cmd is not None
    return shard, cmd, inner


@command("read", 15, request="[shard, command code, that command's body]",
         reply="that command's reply body", validate=_v_read)
def read(shard: int, code: int, body: Any) -> list[Any]:
    """One read command (get 10, get_many 11, scan 12, lookup 13, count 14) for one shard,
    for the reader pool (``lmshardd readers``), where any reader answers for any shard; the
    inner command's body and reply are its own. The reader pool also answers ``ping`` with
    its own health. Shard owners refuse ``read``: send the inner command to the owner."""
    return [shard, code, body]


@command("stats", 20, request="nil", reply="map: env, tables, owner counters",
         validate=_no_body)
def stats() -> None:
    """The shard's table and environment statistics plus the owner's own counters."""
    return None


def next_page(
    last: bytes, lo: bytes | None, hi: bytes | None, reverse: bool
) -> tuple[bytes | None, bytes | None] | None:
    """The bounds of the next scan page after a page ending at key ``last``; None when no
    key can follow it."""
    if reverse:
        return lo, last
    if len(last) < MAX_KEY_SIZE:
        return last + b"\x00", hi
    # A bound longer than any key is refused; the next key differs before its end.
    after = prefix_end(last)
    return None if after is None else (after, hi)


def range_for_prefix(prefix: bytes) -> tuple[bytes, bytes | None]:
    return prefix, prefix_end(prefix)


# -- documentation ------------------------------------------------------------------------------


def render_markdown() -> str:
    """docs/protocol.md, generated from the registry so it cannot drift."""
    import lmshard.config  # noqa: F401  (its ConfigError belongs in the error table)

    lines = [
        "# lmshard wire protocol",
        "",
        "Generated from `lmshard.protocol` by `python -m lmshard.protocol`; do not edit.",
        "",
        f"Protocol version {PROTOCOL_VERSION}. Every frame is one ZeroMQ frame: the version byte "
        "followed by one msgpack array. Clients use a DEALER socket per shard owner; the owner a "
        "ROUTER.",
        "",
        "- request: `[command code, client id (16 bytes or nil), sequence number, body]`",
        "- reply: `[sequence number, status, body]`; status 0 is success, otherwise an error "
        "code from the table below and the body is `[message, hint]`.",
        "",
        f"Limits: frame {MAX_FRAME_SIZE // 2**20} MiB, {MAX_OPS_PER_BATCH:,} ops per batch, "
        f"keys 1..{MAX_KEY_SIZE} bytes (LMDB's limit), values {MAX_VALUE_SIZE // 2**20} MiB, "
        f"scan pages {MAX_SCAN_PAGE:,} rows.",
        "",
        "## Commands",
        "",
    ]
    for cmd in sorted(COMMANDS.values(), key=lambda c: c.code):
        lines += [
            f"### `{cmd.name}` (code {cmd.code}{', a write' if cmd.writes else ''})",
            "",
            f"- request body: `{cmd.request}`",
            f"- reply body: `{cmd.reply}`",
            "",
            cmd.doc,
            "",
        ]
    lines += ["## Error codes", "", "| code | exception | meaning | hint |", "|---|---|---|---|"]
    for code, cls in sorted(error_classes().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"| {code} | `lmshard.{cls.__name__}` | {doc} | {cls.hint} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
