"""The request channel's commands: one declaration each, used by both sides.

A ``Command`` holds the client's body builder (the decorated function, whose docstring is the
command's specification), the owner's validation and handler, and its ``wire.Message`` (code,
fields, doc) in the ``requests`` channel, so ``docs/protocol.md`` lists it with every other
channel. Clients build bodies and frames only through a command (``GET.build(...)``,
``WRITE_AFTER.frame(...)``); owners and readers dispatch by code through ``BY_CODE``.

The reader pool carries the same read commands inside ``read`` (code 15), whose body has one
validator, ``read_parts``, used by owners and readers alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmshard import wire
from lmshard.errors import LimitExceeded, ProtocolError
from lmshard.keys import MAX_KEY_SIZE
from lmshard.protocol.frames import pack_request
from lmshard.protocol.ops import (
    MAX_OPS_PER_BATCH,
    OP_DELETE,
    OP_PUT,
    Op,
    bound_table,
    checked_bound,
    checked_key,
    need,
    validate_ops,
)
from lmshard.txn import BoundTable, ReadTxn, TableMap, prefix_end

MAX_SCAN_PAGE = 10_000
"""Most rows one scan reply carries; the client asks again from the next key."""
SCAN_PAGE = 1000
"""Rows per page a client asks for when a scan goes over the wire (owners or reader pool)."""
PIPELINE_WINDOW = 8
"""Most batches a pipelined writer keeps in flight per shard; the owner keeps this many replies
per stream, so a batch resent after a lost connection is answered as it was the first time."""

REQUESTS = wire.channel(
    "requests",
    "Clients to shard owners (a DEALER socket per owner, the owner's ROUTER) and to the reader "
    "pool (a DEALER socket per reader). Owners serve every command but `read`; readers serve "
    "`read` and `ping`. Each command's section below gives its bodies and specification.",
    "one frame: the version byte and a msgpack array; request `[code, client id (16 bytes or "
    "nil), sequence number, body]`, reply `[sequence number, status, body]`",
)
"""The request channel; its messages are the commands below, in ``wire.CHANNELS``."""

Validate = Callable[[TableMap, Any], Any]
Handle = Callable[[ReadTxn, Any], Any]


@dataclass(frozen=True)
class Command:
    """One wire command: its message, the client's body builder, the owner's validation and
    handler. ``writes`` commands go through group commit; the others run in a read txn.
    ``request`` describes the body (derived from the message's fields unless it is no array of
    fields); ``reply`` the reply body."""

    message: wire.Message
    request: str
    reply: str
    build: Callable[..., Any]
    validate: Validate
    handle: Handle | None
    writes: bool = False

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def code(self) -> int:
        return self.message.code

    @property
    def doc(self) -> str:
        return self.message.doc

    def request_for(self, *args: Any) -> tuple[int, Any]:
        """``(code, body)`` of a request with these arguments, for a transport that adds the
        sequence number and client id itself."""
        return self.message.code, self.build(*args)

    def frame(self, client_id: bytes | None, seq: int, *args: Any) -> bytes:
        """A whole request frame with these arguments."""
        return pack_request(self.message.code, client_id, seq, self.build(*args))


COMMANDS: dict[str, Command] = {}
"""Every command by name."""
BY_CODE: dict[int, Command] = {}
"""Every command by code: how owners and readers dispatch."""


def command(
    name: str, code: int, *, fields: tuple[wire.Field, ...] = (), request: str | None = None,
    reply: str, writes: bool = False, validate: Validate, handle: Handle | None = None,
) -> Callable[[Callable[..., Any]], Command]:
    """Register a command; the decorated function is its client-side body builder and its
    docstring is the spec."""

    def register(build: Callable[..., Any]) -> Command:
        doc = inspect.cleandoc(build.__doc__ or "")
        message = REQUESTS.declare(code, name, "client", fields, doc)
        shape = request if request is not None else f"[{', '.join(f.name for f in fields)}]"
        cmd = Command(message, shape, reply, build, validate, handle, writes)
        COMMANDS[name] = BY_CODE[code] = cmd
        return cmd

    return register


def _body(body: Any, name: str) -> list[Any]:
    """``body`` as the array of fields command ``name`` declares; ProtocolError otherwise."""
    fields = REQUESTS.by_name[name].fields
    if type(body) is not list or len(body) != len(fields):
        raise ProtocolError(f"{name} body is [{', '.join(f.name for f in fields)}]")
    return body


def _is_bytes(v: Any) -> bool:
    return type(v) is bytes


def _is_table_id(v: Any) -> bool:
    return type(v) is bytes and len(v) == 16


def _is_key(v: Any) -> bool:
    return type(v) is bytes and 0 < len(v) <= MAX_KEY_SIZE


def _is_bound(v: Any) -> bool:
    return v is None or (type(v) is bytes and len(v) <= MAX_KEY_SIZE)


def _is_list(v: Any) -> bool:
    return type(v) is list


def _anything(v: Any) -> bool:
    return True


def _is_page(v: Any) -> bool:
    return type(v) is int and 0 < v <= MAX_SCAN_PAGE


TABLE_ID = wire.Field("table id", _is_table_id, "the table's UUID, 16 bytes")
KEY = wire.Field("key", _is_key, f"an encoded key, 1..{MAX_KEY_SIZE} bytes")
LO = wire.Field("lo", _is_bound, "encoded lower bound (inclusive), or nil")
HI = wire.Field("hi", _is_bound, "encoded upper bound (exclusive), or nil")
REVERSE = wire.Field("reverse", wire.flag, "descending key order")
OPS = wire.Field("ops", _is_list, "[[op, table id, key, arg], ...]")


def _no_body(tables: TableMap, body: Any) -> None:
    need(body is None, "this command takes no body")


@command("ping", 1, request="nil",
         reply="map: shard, pid, txn_id, map_size, map_used, uptime, ..., slots (the slot map "
         "version and the slots moving: version, frozen, incoming, outgoing)",
         validate=_no_body)
def ping() -> None:
    """Liveness and health: answered by the owner's loop between commits, so a reply also
    proves the loop is not stuck. The owner fills in the reply itself. The reader pool answers
    it too, with its own health."""
    return None


def _v_write(tables: TableMap, body: Any) -> list[Op]:
    return validate_ops(tables, body)


class OrderedOps(list[Op]):
    """The validated ops of a pipelined batch and the sequence number it must follow."""

    __slots__ = ("after",)

    def __init__(self, ops: list[Op], after: int) -> None:
        super().__init__(ops)
        self.after = after


def _v_write_after(tables: TableMap, body: Any) -> OrderedOps:
    after, ops = _body(body, "write_after")
    need(wire.uint(after), "after must be a sequence number")
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


@command("write", 2, request=OPS.doc, reply="[txn id, [result per op]]", writes=True,
         validate=_v_write)
def write(ops: list[list[Any]]) -> list[list[Any]]:
    """An atomic batch of ops for one shard, applied once per (client id, sequence number).

    Ops: ``put`` (1, arg = value bytes), ``delete`` (2, arg nil; result: whether a row was
    there), ``cas`` (3, arg = [value, kind, expected]: kind 0 the row must be absent, 1 the row
    must hold a value equal to ``expected`` (encoded), 2 ``expected`` is the value's 16-byte
    BLAKE2b hash; result true; a mismatch fails the batch with ConflictError), ``incr``
    (4, arg = int64 delta; result: the new value), ``persist`` (5, arg nil; result: whether
    the row had an expiry, now removed). A table declared with ttl stores each row as an
    8-byte big-endian expiry (ms since the epoch, all ones: never), then the codec's bytes: its
    put and cas values carry that header (the client stamps now + ttl), its rows read back
    with it, and reads never return a row whose expiry has passed; an incr keeps the row's
    expiry. The owner deletes expired rows between commits, as ordinary deletes. The owner
    commits many batches in one LMDB
    transaction (group commit), each in a nested transaction, so a failing batch fails alone.
    The reply carries the shard's txn id the batch committed in. A retried batch (same client id
    and sequence number) is answered from the shard's meta table and not applied again."""
    return ops


@command("write_after", 3, fields=(wire.Field("after", wire.uint, "sequence number"), OPS),
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


def _v_get(tables: TableMap, body: Any) -> tuple[BoundTable, bytes]:
    tid, kb = _body(body, "get")
    b = bound_table(tables, tid)
    return b, checked_key(b, kb)


def _h_get(r: ReadTxn, args: tuple[BoundTable, bytes]) -> bytes | None:
    return r.get_raw(args[0].table, args[1])


@command("get", 10, fields=(TABLE_ID, KEY), reply="value bytes or nil",
         validate=_v_get, handle=_h_get)
def get(table_id: bytes, key: bytes) -> list[Any]:
    """One row's stored value, for clients that cannot map the shard's files."""
    return [table_id, key]


def _v_get_many(tables: TableMap, body: Any) -> tuple[BoundTable, list[bytes]]:
    tid, keys = _body(body, "get_many")
    need(type(keys) is list, "get_many body is [table id, keys]: keys is an array")
    b = bound_table(tables, tid)
    if len(keys) > MAX_OPS_PER_BATCH:
        raise LimitExceeded(f"get_many of {len(keys):,} keys is over {MAX_OPS_PER_BATCH:,}")
    return b, [checked_key(b, k) for k in keys]


def _h_get_many(r: ReadTxn, args: tuple[BoundTable, list[bytes]]) -> list[bytes | None]:
    b, keys = args
    return [r.get_raw(b.table, k) for k in keys]


@command("get_many", 11, fields=(TABLE_ID, wire.Field("keys", _is_list, "[key, ...]")),
         reply="[value bytes or nil, ...]", validate=_v_get_many, handle=_h_get_many)
def get_many(table_id: bytes, keys: list[bytes]) -> list[Any]:
    """Several rows of one table from one snapshot, in request order."""
    return [table_id, keys]


def _v_scan(tables: TableMap, body: Any) -> tuple[BoundTable, Any, Any, bool, int]:
    tid, lo, hi, reverse, limit = _body(body, "scan")
    b = bound_table(tables, tid)
    need(REVERSE.check(reverse), "reverse must be a bool")
    need(_is_page(limit), f"scan page limit must be 1..{MAX_SCAN_PAGE}")
    return b, checked_bound(lo), checked_bound(hi), reverse, limit


def _h_scan(r: ReadTxn, args: tuple[BoundTable, Any, Any, bool, int]) -> list[Any]:
    b, lo, hi, reverse, limit = args
    items: list[list[bytes]] = []
    for kv in r.scan_raw(b.table, lo, hi, reverse):
        if len(items) == limit:
            return [items, True]
        items.append(list(kv))
    return [items, False]


@command("scan", 12, fields=(TABLE_ID, LO, HI, REVERSE, wire.Field(
    "limit", _is_page, f"most rows in the reply, 1..{MAX_SCAN_PAGE}")),
    reply="[[[key, value], ...], more]", validate=_v_scan, handle=_h_scan)
def scan(table_id: bytes, lo: bytes | None, hi: bytes | None, reverse: bool,
         limit: int) -> list[Any]:
    """One page of rows with ``lo <= key < hi`` in key order (or reverse). ``more`` is true
    when rows remain; the client asks again from just past the last key it got."""
    return [table_id, lo, hi, reverse, limit]


def _v_lookup(tables: TableMap, body: Any) -> tuple[BoundTable, str, bytes, bool]:
    tid, index, ivb, prefix = _body(body, "lookup")
    b = bound_table(tables, tid)
    need(type(index) is str, "index name must be a string")
    b.index(index)
    need(type(ivb) is bytes and len(ivb) <= MAX_KEY_SIZE and (len(ivb) > 0 or prefix is True),
         f"index value must be 1..{MAX_KEY_SIZE} bytes (empty only as a prefix)")
    need(wire.flag(prefix), "prefix must be a bool")
    return b, index, ivb, prefix


def _h_lookup(r: ReadTxn, args: tuple[BoundTable, str, bytes, bool]) -> list[list[bytes]]:
    b, index, ivb, prefix = args
    return [[rk, data] for rk, data in r.lookup_rows_raw(b.table, index, ivb, prefix)]


@command("lookup", 13, fields=(
    TABLE_ID, wire.Field("index", wire.text, "the index name"),
    wire.Field("value", _is_bytes, "the encoded index value (or its prefix)"),
    wire.Field("prefix", wire.flag, "match index values that start with value")),
    reply="[[key, value], ...]", validate=_v_lookup, handle=_h_lookup)
def lookup(table_id: bytes, index: str, value: bytes, prefix: bool) -> list[Any]:
    """Rows whose index value equals the encoded value (or starts with it, ``prefix``)."""
    return [table_id, index, value, prefix]


def _v_count(tables: TableMap, body: Any) -> tuple[BoundTable, Any, Any]:
    tid, lo, hi = _body(body, "count")
    return bound_table(tables, tid), checked_bound(lo), checked_bound(hi)


def _h_count(r: ReadTxn, args: tuple[BoundTable, Any, Any]) -> int:
    b, lo, hi = args
    return r.count_raw(b.table, lo, hi)


@command("count", 14, fields=(TABLE_ID, LO, HI), reply="int",
         validate=_v_count, handle=_h_count)
def count(table_id: bytes, lo: bytes | None, hi: bytes | None) -> list[Any]:
    """Rows of a table, or of the key range ``lo <= key < hi``."""
    return [table_id, lo, hi]


READ_COMMANDS = ("get", "get_many", "scan", "lookup", "count")
"""The read commands the reader pool serves inside ``read``."""


def read_parts(body: Any, shards: int | None = None) -> tuple[int, Command, Any]:
    """Check a ``read`` body ``[shard, code, body]``: the shard (below ``shards`` when given),
    the read command, and its own body, which the caller validates with that command's
    ``validate`` against the shard's tables."""
    shard, code, inner = _body(body, "read")
    if type(shard) is not int or shard < 0 or (shards is not None and shard >= shards):
        upto = "" if shards is None else f" from 0 to {shards - 1}"
        raise ProtocolError(f"shard must be an int{upto}, not {shard!r:.20}")
    cmd = BY_CODE.get(code) if type(code) is int else None
    if cmd is None or cmd.name not in READ_COMMANDS:
        raise ProtocolError(
            f"the reader pool serves {', '.join(READ_COMMANDS)}; not command {code!r:.20}",
            hint="send writes, ping and stats for a shard to its owner",
        )
    return shard, cmd, inner


def _v_read(tables: TableMap, body: Any) -> tuple[int, Command, Any]:
    return read_parts(body)


@command("read", 15, fields=(
    wire.Field("shard", wire.uint, "the shard to read"),
    wire.Field("command code", wire.uint, "get 10, get_many 11, scan 12, lookup 13, count 14"),
    wire.Field("body", _anything, "that command's body")),
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


@command("promote", 30, request="nil",
         reply="map: member, epoch (the shard's new epoch), applied (the old primary's last "
         "txn id this copy applied), lag_txns", validate=_no_body)
def promote() -> None:
    """Admin (``lmshard failover``): make the replica that receives it the shard's primary.
    It stops following, takes an epoch above every epoch a reachable copy reports, records
    that it is primary, and serves the shard at its own endpoints as the owner (same
    process, same request socket); it answers once it serves. Copies that are not replicas
    refuse it (an owner with ProtocolError)."""
    return None


def _v_slot_state(tables: TableMap, body: Any) -> Any:
    need(body is None or isinstance(body, dict), "slot_state body is nil or a slot state map")
    return body


@command("slot_state", 31, request="nil, or map: version, map (slots, shards, runs), frozen, "
         "incoming, outgoing (each [[first slot, end slot], ...])",
         reply="map: shard, state (the same map), txn (the owner's last txn id)",
         validate=_v_slot_state)
def slot_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Admin (``lmshard reshard``): nil reads the owner's slot state; a state records it in
    the shard's meta database in one write transaction (and its change log, for replicas)
    and the owner serves by it from then on: writes to ``frozen`` slots are answered
    SlotsMoving, writes routed by an older map to slots it does not own SlotMoved, and rows
    of ``incoming`` and ``outgoing`` slots are never read. A state of a lower version than
    the shard's is refused (ProtocolError)."""
    return state


class MovedOps(list[Op]):
    """The validated ops of a ``move_rows`` batch: puts and deletes a re-shard makes."""

    __slots__ = ()


def _v_move_rows(tables: TableMap, body: Any) -> MovedOps:
    ops = validate_ops(tables, body)
    need(all(o[0] in (OP_PUT, OP_DELETE) for o in ops), "move_rows carries puts and deletes")
    return MovedOps(ops)


@command("move_rows", 32, request=OPS.doc, reply="[txn id, [result per op]]", writes=True,
         validate=_v_move_rows)
def move_rows(ops: list[list[Any]]) -> list[list[Any]]:
    """Admin (``lmshard reshard``): a batch of puts (1) and deletes (2) of rows, stored as
    they are (a table with ttl: with their expiry), applied like ``write`` (once per client id
    and sequence number), but only to rows of the shard's ``incoming`` slots (copying them
    here) or ``outgoing`` slots (dropping them here); any other row fails the batch with
    ProtocolError. Watchers never see these changes; replicas apply them."""
    return ops


PING, WRITE, WRITE_AFTER, GET, GET_MANY, SCAN, LOOKUP, COUNT, READ, STATS, PROMOTE = (
    ping, write, write_after, get, get_many, scan, lookup, count, read, stats, promote)
SLOT_STATE, MOVE_ROWS = slot_state, move_rows
READ_CODES = frozenset(COMMANDS[name].code for name in READ_COMMANDS)
"""The codes of ``READ_COMMANDS``."""


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


def paged_scan(
    ask: Callable[[list[Any]], Any], table_id: bytes, lo: bytes | None, hi: bytes | None,
    reverse: bool, page: int = SCAN_PAGE,
) -> Iterator[tuple[bytes, bytes]]:
    """Every encoded (key, value) with ``lo <= key < hi``, a ``scan`` page at a time:
    ``ask(body)`` sends one scan body and returns its reply body. Each page is its own
    snapshot: rows written between pages may or may not show up, rows are never repeated or
    skipped out of key order."""
    page = max(1, min(page, MAX_SCAN_PAGE))
    while True:
        items, more = ask(SCAN.build(table_id, lo, hi, reverse, page))
        yield from ((k, v) for k, v in items)
        if not more or not items:
            return
        bounds = next_page(items[-1][0], lo, hi, reverse)
        if bounds is None:
            return
        lo, hi = bounds


def range_for_prefix(prefix: bytes) -> tuple[bytes, bytes | None]:
    return prefix, prefix_end(prefix)
