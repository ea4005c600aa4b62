"""The owners' plain unix stream sockets: how same-host clients' requests skip ZeroMQ's threads.

A request through ZeroMQ crosses four threads each way on one host: the client's, the client's
ZeroMQ I/O thread, the owner's I/O thread, the owner's (each hand-off a wake-up, each wake-up
across cores a few microseconds on a VM). A plain unix stream socket has one wake-up a
direction. So with ``shard.unix_socket`` on (the default) an owner whose endpoint is
``ipc://PATH`` also listens on ``PATH`` + ``UNIX_SUFFIX``, and a client on the same host sends
its one-at-a-time requests there (``lmshard.unix_client``); everything else (several shards at
once, the pipelined writer, the async client, watches) stays on ZeroMQ.

The bytes are the ZeroMQ path's own frames (``lmshard.protocol``: the request frame, the reply
frame), each behind a 4-byte big-endian length: the owner serves them with the same code, so
sequence numbers, client records and every reply mean the same on both paths, and a request
may be sent again over either one (the owner applies a (client id, sequence) once).
"""

from __future__ import annotations

import struct

from lmshard.protocol import MAX_FRAME_SIZE

UNIX_SUFFIX = ".u"
"""Appended to an ipc endpoint's path: the owner's unix stream socket beside its ROUTER's."""
HEADER = struct.Struct(">I")
"""Each frame's length, before the frame."""
MAX_UNIX_FRAME = MAX_FRAME_SIZE + 1024
"""Longest frame either side accepts (the ROUTER's MAXMSGSIZE); a longer length header closes
the connection."""
CLIENT_MAX_FRAME = 256 * 1024
"""Longest request a client sends this way; longer ones go through ZeroMQ (a large batch pays
for its hand-offs many times over, and a short send never waits for a busy owner's reads)."""
MAX_PATH = 107
"""Longest unix socket path (sun_path holds 108 bytes with the NUL)."""


def unix_path(endpoint: str) -> str | None:
    """The unix socket of the owner at ``endpoint``: its ipc path + ``UNIX_SUFFIX``; None for
    other transports, or when the path would be too long for a unix socket."""
    if not endpoint.startswith("ipc:///"):
        return None
    path = endpoint[len("ipc://"):] + UNIX_SUFFIX
    return path if len(path.encode()) <= MAX_PATH else None


def pack(frame: bytes) -> bytes:
    """``frame`` behind its length."""
    return HEADER.pack(len(frame)) + frame
