"""The owners' plain unix stream sockets: how same-host clients' requests skip ZeroMQ's threads.

A request through ZeroMQ crosses four threads each way on one host: the client's, the client's
ZeroMQ I/O thread, the owner's I/O thread, the owner's (each hand-off a wake-up, each wake-up
across cores a few microseconds on a VM). A plain unix stream socket has one wake-up a
direction. So with ``shard.unix_socket`` on (the default) an owner whose endpoint is
``ipc://PATH`` also listens on ``PATH`` + ``UNIX_SUFFIX``, and a client on the same host sends
its one-at-a-time requests there (``lmshard.unix_client``); everything else (several shards at
once, the pipelined writer, watches) stays on ZeroMQ. The async client sends its one-shard
requests there too, many in flight on one connection (``lmshard.aio_owners``).

The bytes are the ZeroMQ path's own frames (``lmshard.protocol``: the request frame, the reply
frame), each behind a 4-byte big-endian length: the owner serves them with the same code, so
sequence numbers, client records and every reply mean the same on both paths, and a request
may be sent again over either one (the owner applies a (client id, sequence) once).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from lmshard.protocol import MAX_FRAME_SIZE

log = logging.getLogger("lmshard.client")

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
RECV_SIZE = 65536
"""Bytes a client asks for per recv call while no larger frame is being read."""
RECV_MAX = 2**20
"""Most bytes a client asks for per recv call while a large frame is read (the rest comes in
later calls): a larger buffer is allocated for each call, whatever arrives."""
_NO_OWNER = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTDIR})
"""connect errors that mean no owner is listening there now (EAGAIN: its accept queue is
full), rather than a problem to report."""


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


def connect(path: str) -> socket.socket | None:
    """A non-blocking connection to the owner listening on ``path``; None at once when there
    is none: no owner listens there now (no such file, nothing accepting on it, its accept
    queue full), or the connect failed otherwise (no permission: logged). The caller's
    requests then go through ZeroMQ, which reaches the same owner."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)  # a full accept queue fails the connect, not waits
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno not in _NO_OWNER:
            log.debug("cannot connect to %s (%s): requests go through ZeroMQ", path, exc)
        return None
    return sock


class FrameTooLong(ValueError):
    """A length header over MAX_UNIX_FRAME: the stream is not one to read on."""


class FrameBuffer:
    """What a client received on its connection and has not taken: reply frames, whole or in
    pieces (one may arrive in several reads, several in one)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""

    def add(self, chunk: bytes) -> None:
        buf = self._buf
        if not buf:
            self._buf = chunk
        elif type(buf) is bytes:  # a frame in pieces: gather them in one growing buffer
            self._buf = bytearray(buf) + chunk
        else:
            buf += chunk

    def take(self) -> bytes | None:
        """The first frame buffered, if it is all there (taken off the buffer); FrameTooLong
        for a length over the limit."""
        buf = self._buf
        if len(buf) < 4:
            return None
        size = HEADER.unpack_from(buf)[0] + 4
        if len(buf) < size:
            if size > MAX_UNIX_FRAME + 4:
                raise FrameTooLong(f"a reply of {size - 4:,} bytes is over the limit")
            return None
        self._buf = buf[size:]
        return buf[4:size] if type(buf) is bytes else bytes(memoryview(buf)[4:size])

    def ask(self) -> int:
        """How many bytes the next recv asks for: the rest of a large frame being read, up to
        RECV_MAX, else RECV_SIZE."""
        buf = self._buf
        if len(buf) < 4:
            return RECV_SIZE
        missing: int = HEADER.unpack_from(buf)[0] + 4 - len(buf)
        return min(max(RECV_SIZE, missing), RECV_MAX)

    def clear(self) -> None:
        self._buf = b""
