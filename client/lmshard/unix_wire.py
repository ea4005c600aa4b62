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
from collections import deque

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


_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


def pack(frame: bytes) -> bytes:
    """``frame`` behind its length."""
    return _pack_header(len(frame)) + frame


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
    """A length header over MAX_UNIX_FRAME: the stream is not one to read on. ``frames``: the
    whole frames that came before it, taken off the buffer with it."""

    def __init__(self, message: str, frames: list[bytes]) -> None:
        super().__init__(message)
        self.frames = frames


class FrameBuffer:
    """What one side received on a connection and has not taken: frames, whole or in pieces
    (one may arrive in several reads, several in one). The owner and the async client take
    every whole frame at once (``take_all``), the sync client one at a time (``take``)."""

    __slots__ = ("_buf", "_ready")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._ready: deque[bytes] = deque()
        """Whole frames cut off the buffer and not taken yet (``take``)."""

    def add(self, chunk: bytes) -> None:
        buf = self._buf
        if not buf:
            self._buf = chunk
        elif type(buf) is bytes:  # a frame in pieces: gather them in one growing buffer
            self._buf = bytearray(buf) + chunk
        else:
            buf += chunk

    def take(self) -> bytes | None:
        """The first whole frame buffered (taken off the buffer), None when none is all there;
        FrameTooLong for a length over the limit, once the frames before it are taken."""
        ready = self._ready
        if not ready:
            try:
                ready.extend(self._cut())
            except FrameTooLong as exc:
                if not exc.frames:
                    raise
                ready.extend(exc.frames)  # the bad length is next: the next cut raises
        return ready.popleft() if ready else None

    def take_all(self) -> list[bytes]:
        """Every whole frame buffered, in order (taken off the buffer); FrameTooLong for a
        length over the limit (with the frames before it)."""
        ready = self._ready
        if not ready:
            return self._cut()
        before = list(ready)
        ready.clear()
        try:
            return before + self._cut()
        except FrameTooLong as exc:
            exc.frames[:0] = before
            raise

    def _cut(self) -> list[bytes]:
        """The whole frames at the start of the buffer, taken off it."""
        buf = self._buf
        at, end = 0, len(buf)
        out: list[bytes] = []
        whole = type(buf) is bytes
        try:
            while end - at >= _HEADER_SIZE:
                (size,) = _unpack_header(buf, at)
                if size > MAX_UNIX_FRAME:
                    raise FrameTooLong(f"a frame of {size:,} bytes is over the limit of "
                                       f"{MAX_UNIX_FRAME:,} bytes", out)
                stop = at + _HEADER_SIZE + size
                if stop > end:
                    break
                start = at + _HEADER_SIZE
                out.append(buf[start:stop] if whole  # type: ignore[arg-type]
                           else bytes(memoryview(buf)[start:stop]))
                at = stop
        finally:
            if at:
                self._buf = buf[at:] if at < end else b""
        return out

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
        self._ready.clear()
