"""The backup socket's messages, declared once for both sides: the coordinator
(``lmshard.ops.backup``) builds and reads its frames here, and so does the owner's backup server
(``lmshardd.backup``), which must not import operator tooling.

A message is one frame: the backup channel's version byte, then a msgpack array
``[code, session, attempt, *fields]``; the session is 16 bytes the coordinator picks per backup,
the attempt numbers its tries at the consistent cut within that backup. A message declared with
``data`` is followed by a second frame holding raw bytes. The channel is registered in
``lmshard.wire.CHANNELS``; ``docs/backup.md``'s message table is ``message_table()``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from lmshard import wire
from lmshard.errors import ProtocolError
from lmshard.wire import Field, Message

BACKUP_VERSION = 2
"""The first byte of every backup frame, bumped on any incompatible change of the channel's
frames (2: every message carries the attempt id). Apart from the request channel's version, so
the backup socket can change alone; a coordinator and owners of different versions refuse each
other's frames with a ProtocolError that names both versions."""

MAX_CHUNK_SIZE = 2**20
"""Largest chunk an owner agrees to send: 1 MiB."""
MIN_CHUNK_SIZE = 4096
"""Smallest chunk an owner agrees to send: 4 KiB."""
MAX_IN_FLIGHT = 8 * 2**20
"""Most bytes of granted, unsent credit an owner keeps per stream: 8 MiB; more is ignored."""
MAX_CREDIT = 2**20
"""Most chunks one CREDIT message may grant."""
MAX_PAUSE_TIMEOUT = 10.0
"""The longest pause a coordinator may ask for, in seconds."""
MAX_CONTROL_FRAME = 64 * 2**10
"""Largest control frame either side decodes (chunk data travels in a frame of its own)."""
SESSION_SIZE = 16
"""Bytes of a session id; an owner's ERROR to a frame it could not read carries an empty one."""
NO_ATTEMPT = 0
"""The attempt of an owner's ERROR to a frame it could not read (coordinators count from 1)."""

_VERSION_BYTE = bytes([BACKUP_VERSION])
_packb = msgpack.Packer(use_bin_type=True).pack


class Decoded(NamedTuple):
    """A message as received: which one, for which session and attempt, its fields, its data."""

    message: Message
    session: bytes
    attempt: int
    values: list[Any]
    data: bytes | None


def _credit(v: Any) -> bool:
    return type(v) is int and 1 <= v <= MAX_CREDIT


def _chunk_size(v: Any) -> bool:
    return type(v) is int and MIN_CHUNK_SIZE <= v <= MAX_CHUNK_SIZE


def _timeout_ms(v: Any) -> bool:
    return type(v) is int and 1 <= v <= MAX_PAUSE_TIMEOUT * 1000


CHANNEL = wire.channel(
    "backup",
    "Each shard owner binds a ROUTER on `shard.backup_endpoint`; a backup coordinator connects a "
    "DEALER to every owner, takes a consistent cut with a two-phase commit barrier and receives "
    "each shard's compacted copy in chunks, with credit-based flow control (docs/backup.md).",
    f"the backup version byte ({BACKUP_VERSION}), then a msgpack array "
    "`[code, session, attempt, fields...]`; `session` is 16 random bytes per backup, `attempt` "
    "numbers the coordinator's tries at the consistent cut within it (1, 2, ...; a backup "
    "without a cut uses 1). An owner's answer carries the session and attempt of the request "
    "it answers, and the stream messages those of the snapshot they stream, so an answer to an "
    "abandoned attempt is recognised as such. `CHUNK` is followed by a second frame holding "
    "the bytes.",
)

PAUSE = CHANNEL.declare(
    1, "PAUSE", "coordinator", (Field("timeout_ms", _timeout_ms),),
    "Phase 1 of a consistent cut. The owner finishes the group commit in progress, holds later "
    "write batches in its socket (they are not lost, only delayed) and answers PAUSED. If "
    "neither SNAPSHOT nor RESUME of this session and attempt follows within timeout_ms, the "
    "owner lifts the pause by itself. One pause per owner at a time: a second session gets "
    "ERROR; a later attempt of the session holding the pause takes it over (writes stay held), "
    "an earlier one gets ERROR.")
SNAPSHOT = CHANNEL.declare(
    2, "SNAPSHOT", "coordinator",
    (Field("consistent", wire.flag), Field("chunk_size", _chunk_size)),
    "Open the snapshot: the owner begins a read transaction and answers READY. With "
    "consistent=true this is phase 2 of the cut: the pause must be held by this session and "
    "attempt, and is lifted once the transaction is open. With consistent=false no pause is "
    "needed. The owner then copies its environment, compacted, from that transaction and sends "
    "it in CHUNKs of at most chunk_size bytes as CREDIT of the same attempt allows.")
CREDIT = CHANNEL.declare(
    3, "CREDIT", "coordinator", (Field("chunks", _credit),),
    "Permission to send this many more CHUNKs. The coordinator keeps several chunks of credit "
    "outstanding so the stream never waits for a round trip; the owner never sends a chunk it "
    "has no credit for (and keeps at most 8 MiB of credit).")
RESUME = CHANNEL.declare(
    4, "RESUME", "coordinator", (),
    "Lift this session's pause if this attempt or an earlier one took it (the cut is "
    "abandoned). Answered by RESUMED, also when there was no such pause.")
CANCEL = CHANNEL.declare(
    5, "CANCEL", "coordinator", (),
    "Stop this attempt's stream and release its read transaction, also one whose SNAPSHOT is "
    "still being opened. Not answered.")
PAUSED = CHANNEL.declare(
    101, "PAUSED", "owner", (Field("txn_id", wire.uint),),
    "The owner is paused for this attempt; txn_id is the last transaction it committed.")
READY = CHANNEL.declare(
    102, "READY", "owner",
    (Field("txn_id", wire.uint), Field("estimate", wire.uint), Field("paused_us", wire.uint)),
    "The snapshot is open at txn_id and the pause (if any) is lifted. estimate is the expected "
    "size of the compacted copy in bytes; paused_us how long writes were held (0 without a "
    "pause), counted from the first attempt of the session whose pause this one took over.")
CHUNK = CHANNEL.declare(
    103, "CHUNK", "owner", (Field("offset", wire.uint),),
    "The bytes of the copy at offset, in the data frame that follows; uses one credit. Chunks "
    "arrive in order; an empty stream sends none.", data=True)
END = CHANNEL.declare(
    104, "END", "owner", (Field("size", wire.uint), Field("sha256", wire.text)),
    "The copy is complete: size bytes in all, with this SHA-256 (hex). The owner has released "
    "the read transaction.")
RESUMED = CHANNEL.declare(
    105, "RESUMED", "owner", (),
    "Answer to RESUME: no pause of this attempt or an earlier one is held any more.")
ERROR = CHANNEL.declare(
    199, "ERROR", "owner",
    (Field("code", wire.uint), Field("message", wire.text),
     Field("hint", wire.optional(wire.text))),
    "The request of this session and attempt failed, or its stream broke; code is an lmshard "
    "error code (a frame that could not be read gets an empty session and attempt 0). A "
    "stream that gets ERROR is over and its read transaction released.")


def pack(m: Message, session: bytes, attempt: int, *values: Any) -> bytes:
    """The control frame of ``m`` for ``session`` and ``attempt``. Only the number of fields is
    checked here: the receiver checks every value (and tests send bad ones on purpose)."""
    if len(values) != len(m.fields):
        raise TypeError(f"{m.name} takes {len(m.fields)} fields, got {len(values)}")
    frame: bytes = _VERSION_BYTE + _packb([m.code, session, attempt, *values])
    return frame


def _unpack(frame: bytes) -> list[Any]:
    """The msgpack array of a control frame, its size and version byte checked."""
    msg = wire.unpack_control(frame, name="backup", version=BACKUP_VERSION,
                              limit=MAX_CONTROL_FRAME, strict_map_key=False,
                              hint="take backups with the lmshard version the owners run")
    if not isinstance(msg, list):
        raise ProtocolError(f"a frame must hold an array, not {type(msg).__name__}")
    return msg


def decode(frames: list[bytes], sender: str) -> Decoded:
    """A message from ``sender``, checked.

    Raises ProtocolError naming what is wrong; nothing in a frame is trusted.
    """
    if not frames or len(frames) > 2:
        raise ProtocolError(f"a backup message has 1 or 2 frames, this one {len(frames)}")
    msg = _unpack(frames[0])
    if len(msg) < 3 or type(msg[0]) is not int:
        raise ProtocolError("a backup message is [code, session, attempt, fields...]")
    m = CHANNEL.messages.get(msg[0])
    if m is None or m.sender != sender:
        raise ProtocolError(f"unknown backup message code {msg[0]}")
    session, attempt, values = msg[1], msg[2], msg[3:]
    if type(session) is not bytes or len(session) not in (0, SESSION_SIZE):
        raise ProtocolError(f"{m.name}: the session must be {SESSION_SIZE} bytes")
    if not wire.uint(attempt):
        raise ProtocolError(f"{m.name}: bad attempt {attempt!r:.60}")
    problem = m.check(values)
    if problem is not None:
        raise ProtocolError(problem)
    data = frames[1] if len(frames) == 2 else None
    if m.data != (data is not None):
        raise ProtocolError(f"{m.name} {'needs' if m.data else 'takes no'} data frame")
    return Decoded(m, session, attempt, values, data)


def message_table() -> str:
    """The message table of ``docs/backup.md``: the rows of this channel's section of the
    protocol docs, so both pages show the same declaration."""
    rows = [line for line in CHANNEL.markdown().splitlines() if line.startswith("|")]
    return "\n".join(rows) + "\n"
