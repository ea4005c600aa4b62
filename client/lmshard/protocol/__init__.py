"""The wire protocol between clients, shard owners and the reader pool: one registry, both sides.

- ``frames``: the frame layout (version byte, msgpack array), packing and checked unpacking.
- ``ops``: the ops of a write batch and the owner's checks and application of them.
- ``commands``: every command of the ``requests`` channel (``lmshard.wire``), each with its
  body builder, validation, handler and specification.
- ``docs``: ``docs/protocol.md``, rendered from every channel in ``wire.CHANNELS``
  (``python -m lmshard.protocol > docs/protocol.md``).
"""

from __future__ import annotations

from lmshard.protocol.commands import (
    BY_CODE,
    COMMANDS,
    COUNT,
    GET,
    GET_MANY,
    LOOKUP,
    MAX_SCAN_PAGE,
    MOVE_ROWS,
    PING,
    PIPELINE_WINDOW,
    PROMOTE,
    READ,
    READ_CODES,
    READ_COMMANDS,
    REQUESTS,
    SCAN,
    SCAN_PAGE,
    SLOT_STATE,
    STATS,
    WRITE,
    WRITE_AFTER,
    Command,
    MovedOps,
    OrderedOps,
    next_page,
    paged_scan,
    range_for_prefix,
    read_parts,
    replayed_reply,
    stored_reply,
)
from lmshard.protocol.frames import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    VERSION_BYTE,
    ZERO_COPY_MIN,
    pack_error,
    pack_reply,
    pack_request,
    unpack_frame,
    unpack_request,
)
from lmshard.protocol.ops import (
    CAS_ABSENT,
    CAS_HASH,
    CAS_VALUE,
    MAX_OPS_PER_BATCH,
    MAX_VALUE_SIZE,
    OP_CAS,
    OP_DELETE,
    OP_INCR,
    OP_NAMES,
    OP_PERSIST,
    OP_PUT,
    Op,
    apply_ops,
    cas_arg,
    incr_delta,
    op,
    validate_ops,
)

__all__ = [
    "BY_CODE", "CAS_ABSENT", "CAS_HASH", "CAS_VALUE", "COMMANDS", "COUNT", "Command", "GET",
    "GET_MANY", "LOOKUP", "MAX_FRAME_SIZE", "MAX_OPS_PER_BATCH", "MAX_SCAN_PAGE",
    "MAX_VALUE_SIZE", "OP_CAS", "OP_DELETE", "OP_INCR", "OP_PERSIST", "OP_NAMES", "OP_PUT", "Op",
    "OrderedOps", "PING", "PIPELINE_WINDOW", "PROMOTE", "PROTOCOL_VERSION", "READ", "READ_CODES",
    "READ_COMMANDS", "REQUESTS", "SCAN", "SCAN_PAGE", "STATS", "VERSION_BYTE", "WRITE",
    "WRITE_AFTER", "ZERO_COPY_MIN", "apply_ops", "MOVE_ROWS", "SLOT_STATE", "MovedOps",
    "cas_arg", "incr_delta", "next_page", "op",
    "pack_error", "pack_reply", "pack_request", "paged_scan", "range_for_prefix", "read_parts",
    "replayed_reply", "stored_reply", "unpack_frame", "unpack_request", "validate_ops",
]
