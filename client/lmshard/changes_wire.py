"""The change-feed socket's messages, declared once for both sides: the client's ``Watch``
(``lmshard.watch``) and the owner's change server (``lmshardd.changes``) build and read every
frame here.

A message is one frame: the channel's version byte, then a msgpack array ``[code, watch id,
*fields]``; ``CHANGES`` is followed by a data frame holding the msgpack array of the changes,
``[table id, key, value or nil]`` each, exactly as the log stores them. The channel is
registered in ``lmshard.wire.CHANNELS`` (docs/protocol.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from lmshard import wire
from lmshard.errors import ProtocolError
from lmshard.keys import MAX_KEY_SIZE
from lmshard.wire import Field, Message

CHANGES_VERSION = 1
"""The first byte of every change-feed frame."""
MAX_CREDIT = 1024
"""Most messages a watch may have granted and not yet received."""
MAX_TABLES = 1024
"""Most table ids one WATCH may name."""
MAX_CONTROL_FRAME = 64 * 2**10
"""Largest frame an owner decodes from a watcher."""
MAX_WATCH_ID = 2**31
"""Watch ids are 1 .. 2**31 - 1, picked by the watcher."""

_VERSION_BYTE = bytes([CHANGES_VERSION])
_packb = msgpack.Packer(use_bin_type=True).pack


class Decoded(NamedTuple):
    """A message as received: which one, for which watch, its fields, its data frame."""

    message: Message
    watch_id: int
    values: list[Any]
    data: bytes | None


def _credit(v: Any) -> bool:
    return type(v) is int and 1 <= v <= MAX_CREDIT


def _history(v: Any) -> bool:
    return type(v) is str and (v == "" or (len(v) == 16 and all(c in "0123456789abcdef"
                                                                 for c in v)))


def _tables(v: Any) -> bool:
    return v is None or (type(v) is list and len(v) <= MAX_TABLES
                         and all(type(t) is bytes and len(t) == 16 for t in v))


def _prefix(v: Any) -> bool:
    return v is None or (type(v) is bytes and len(v) <= MAX_KEY_SIZE)


def _replica_name(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= 64


def _indexes(v: Any) -> bool:
    return v is None or (type(v) is list and all(type(i) is int and i >= 0 for i in v))


CHANNEL = wire.channel(
    "changes",
    "Each shard owner binds a ROUTER on `shard.changes_endpoint` and serves its change log: a "
    "watcher connects a DEALER, sends WATCH with the position to start from, and gets the log "
    "from there, then every later commit as it happens, as far as its credit allows (a watcher "
    "that stops reading stops the owner sending; it falls behind and catches up from the log, "
    "or is told it fell past retention). Order is per shard, in commit order.",
    f"the changes version byte ({CHANGES_VERSION}), then a msgpack array "
    "`[code, watch_id, fields...]`; `watch_id` (1 .. 2^31-1) is picked by the watcher and "
    "carried by every answer. `CHANGES` is followed by a data frame: the msgpack array of "
    "changes `[table_id, key, value or nil]` as the log stores them.",
)

WATCH = CHANNEL.declare(
    1, "WATCH", "watcher",
    (Field("history", _history, "the log history of the position; empty for the oldest "
                                "retained"),
     Field("txn", wire.optional(wire.uint), "the position's transaction id; nil for the end"),
     Field("n", wire.uint, "changes of transaction txn already seen"),
     Field("tables", _tables, "table ids to watch; nil for all"),
     Field("prefix", _prefix, "encoded key prefix (with exactly one table), or nil"),
     Field("credit", _credit, "messages the owner may send")),
    "Start (or restart) a watch from a position: the owner answers STARTED with the position "
    "resolved, then CHANGES and PROGRESS as credit allows; or COMPACTED when the log no longer "
    "holds the position; or ERROR (a position ahead of the log: InvalidCursor).")
CREDIT = CHANNEL.declare(
    2, "CREDIT", "watcher", (Field("messages", _credit),),
    f"Permission to send this many more CHANGES/PROGRESS messages. A watch may have at most "
    f"{MAX_CREDIT} granted and unsent; more gets ERROR (LimitExceeded) and ends the watch.")
CANCEL = CHANNEL.declare(
    3, "CANCEL", "watcher", (), "End the watch. Not answered.")
REPLICATE = CHANNEL.declare(
    4, "REPLICATE", "replica",
    (Field("replica", _replica_name, "the replica's name (one of replica.names)"),
     Field("history", _history, "the log history the replica's copy follows"),
     Field("txn", wire.uint, "the first transaction the replica has not applied"),
     Field("credit", _credit, "messages the owner may send")),
    "Start (or restart) following the whole log as a replica, from the start of transaction "
    "txn: like WATCH of every table, but each CHANGES also carries the shard's internal "
    "records a copy needs to take over (the clients' last sequence numbers, under table id "
    "16 zero bytes), and the replica reports what it has applied with APPLIED. Answered like "
    "WATCH: STARTED, then CHANGES and PROGRESS; COMPACTED when the log no longer holds txn "
    "(the replica takes a new snapshot).")
APPLIED = CHANNEL.declare(
    5, "APPLIED", "replica", (Field("txn", wire.uint),),
    "The replica has applied, and committed durably, every transaction of the log up to and "
    "including txn. With durability.replicas = k the owner acks a write only once k replicas "
    "said so for its transaction. Not answered.")
STARTED = CHANNEL.declare(
    101, "STARTED", "owner",
    (Field("history", _history), Field("txn", wire.uint), Field("n", wire.uint)),
    "The watch starts at this position (its own for a resumed watch; the end or the oldest "
    "retained for a new one).")
CHANGES = CHANNEL.declare(
    102, "CHANGES", "owner",
    (Field("seq", wire.uint, "1 for the first CHANGES or PROGRESS of the watch, then +1"),
     Field("txn", wire.uint, "the transaction the changes were committed in"),
     Field("indexes", _indexes, "each change's index in the transaction's changes; nil when "
                                "they are all there, from the first")),
    "The watched changes of one committed transaction (those from the watch's position on); "
    "uses one credit. After it the watch's position is (txn + 1, 0).", data=True)
PROGRESS = CHANNEL.declare(
    103, "PROGRESS", "owner",
    (Field("seq", wire.uint), Field("txn", wire.uint)),
    "No watched change before transaction txn that was not sent: the position is (txn, 0). "
    "Sent once a catch-up reaches the end of the log, and every second while idle (a "
    "heartbeat); uses one credit.")
COMPACTED = CHANNEL.declare(
    104, "COMPACTED", "owner",
    (Field("history", _history), Field("txn", wire.uint), Field("message", wire.text)),
    "The log no longer holds the position asked for; (history, txn) is the oldest position it "
    "holds. The watch is over.")
ERROR = CHANNEL.declare(
    199, "ERROR", "owner",
    (Field("code", wire.uint), Field("message", wire.text),
     Field("hint", wire.optional(wire.text))),
    "The request failed; code is an lmshard error code (a frame that could not be read gets "
    "watch id 0). The watch, if there was one, is over.")


def pack(m: Message, watch_id: int, *values: Any) -> bytes:
    """The control frame of ``m`` for ``watch_id`` (only the number of fields is checked here:
    the receiver checks every value)."""
    if len(values) != len(m.fields):
        raise TypeError(f"{m.name} takes {len(m.fields)} fields, got {len(values)}")
    frame: bytes = _VERSION_BYTE + _packb([m.code, watch_id, *values])
    return frame


def decode(frames: list[bytes], sender: str, *, limit: int | None = MAX_CONTROL_FRAME
           ) -> Decoded:
    """A message from ``sender``, checked; ProtocolError (or LimitExceeded) naming what is
    wrong. Nothing in a frame is trusted."""
    if not frames or len(frames) > 2:
        raise ProtocolError(f"a change-feed message has 1 or 2 frames, this one {len(frames)}")
    msg = wire.unpack_control(frames[0], name="change-feed", version=CHANGES_VERSION,
                              limit=limit, hint="watch with the lmshard version the owners run")
    if not isinstance(msg, list) or len(msg) < 2 or type(msg[0]) is not int:
        raise ProtocolError("a change-feed message is [code, watch_id, fields...]")
    m = CHANNEL.messages.get(msg[0])
    if m is None or m.sender != sender:
        raise ProtocolError(f"unknown change-feed message code {msg[0]}")
    wid = msg[1]
    if type(wid) is not int or not 0 <= wid < MAX_WATCH_ID:
        raise ProtocolError(f"{m.name}: bad watch id {wid!r:.60}")
    problem = m.check(msg[2:])
    if problem is not None:
        raise ProtocolError(problem)
    data = frames[1] if len(frames) == 2 else None
    if m.data != (data is not None):
        raise ProtocolError(f"{m.name} {'needs' if m.data else 'takes no'} data frame")
    return Decoded(m, wid, msg[2:], data)
