"""The frames of the request channel: a version byte followed by one msgpack array.

- request: ``[command code, client id (16 bytes or nil), sequence number, body]``, optionally
  followed by the highest epoch of the shard the client has seen (``lmshard.members``; left
  out while it knows none) and then the version of the slot map it routed by
  (``lmshard.slot_state``; left out while it is 0, the epoch then 0 when it has none)
- reply:   ``[sequence number, status, body]``; status 0 is success, any other value is an
  error code from ``lmshard.errors`` and the body is ``[message, hint]``.

Clients, shard owners and the reader pool all read and write frames through these functions;
what a body holds is each command's business (``lmshard.protocol.commands``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from lmshard.errors import Error, LimitExceeded, ProtocolError

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of the frame layout."""
VERSION_BYTE = bytes([PROTOCOL_VERSION])
MAX_FRAME_SIZE = 64 * 2**20
"""Largest frame an owner decodes: 64 MiB."""
ZERO_COPY_MIN = 4 * 2**20
"""Frames from this size on are sent without a copy. Below it a copy is cheaper: sending a
batch of 1,000 rows (about 110 KiB) with a copy took 10-15% less client CPU than pyzmq's
zero-copy send, whose buffer release runs through a separate thread."""

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb


def pack_request(code: int, client_id: bytes | None, seq: int, body: Any,
                 epoch: int = 0, map_version: int = 0) -> bytes:
    """A request frame; build ``code`` and ``body`` with the command (``Command.frame``).
    ``epoch``: the highest epoch of the shard the sender has seen (0: none); ``map_version``:
    the version of the slot map it routed the request by."""
    if map_version:
        return VERSION_BYTE + _packb([code, client_id, seq, body, epoch, map_version])
    if epoch:
        return VERSION_BYTE + _packb([code, client_id, seq, body, epoch])
    return VERSION_BYTE + _packb([code, client_id, seq, body])


def pack_reply(seq: int, status: int, body: Any) -> bytes:
    """A reply frame: status 0 and the command's reply body, or an error code and its body."""
    return VERSION_BYTE + _packb([seq, status, body])


def pack_error(seq: int, err: Error) -> bytes:
    """The reply frame that carries ``err`` to the client, which raises it again typed."""
    return pack_reply(seq, err.code, [err.message, err.hint, *err.wire_fields()])


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


def unpack_request(frame: bytes, max_size: int = MAX_FRAME_SIZE
                   ) -> tuple[int, Any, int, Any, int, int]:
    """``(code, client_id, seq, body, epoch, map_version)``; the seq is 0 when it cannot be
    read, the epoch and map version 0 when the request carries none."""
    msg = unpack_frame(frame, max_size)
    epoch = map_version = 0
    if len(msg) == 6:
        map_version = msg.pop()
        if type(map_version) is not int or not 0 <= map_version < 2**63:
            raise ProtocolError(
                f"slot map version must be a non-negative int, not {map_version!r:.40}")
    if len(msg) == 5:
        epoch = msg.pop()
        if type(epoch) is not int or not 0 <= epoch < 2**63:
            raise ProtocolError(f"epoch must be a non-negative int, not {epoch!r:.40}")
    elif len(msg) != 4:
        raise ProtocolError(f"a request has 4 to 6 fields, this one {len(msg)}")
    code, client_id, seq, body = msg
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise ProtocolError(f"sequence number must be a non-negative int, not {seq!r:.40}")
    if type(code) is not int:
        raise ProtocolError(f"command code must be an int, not {code!r:.40}")
    if client_id is not None and (type(client_id) is not bytes or len(client_id) != 16):
        raise ProtocolError("client id must be 16 bytes or nil")
    return code, client_id, seq, body, epoch, map_version
