"""A client's plain unix stream connection to one shard owner (``lmshard.unix_wire``).

One thread's connection to one owner, beside its DEALER (``lmshard.connections``): a request
frame goes out behind its length, reply frames come back the same way, in the order the owner
committed them (several may be buffered; one may arrive in pieces). The socket stays blocking
and each wait is the kernel's (SO_RCVTIMEO), so a reply costs one recv call; a send that does
not go out at once (a request larger than what the socket buffers while the owner is busy)
waits under SO_SNDTIMEO.

A connection that breaks (the owner closed it, was killed or restarted: end of stream, a reset,
a broken pipe; or a send that did not complete in time, which leaves half a frame in the
stream) is closed and raises ``StreamBroken``; the caller sends the request again over ZeroMQ.
No reply within a wait is not a break: ``recv`` returns None and the stream stays usable.
"""

from __future__ import annotations

import socket
import struct

from lmshard import unix_wire
from lmshard.unix_wire import FrameBuffer, FrameTooLong, pack

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_timeval = struct.Struct("@ll")


class StreamBroken(Exception):
    """The connection to the owner is unusable and was closed (its message says why)."""


def _timeval_ms(ms: int) -> bytes:
    return _timeval.pack(ms // 1000, (ms % 1000) * 1000)


class UnixStream:
    """A blocking unix stream connection to an owner's socket, sending request frames and
    receiving reply frames, each behind its length, with timeouts in milliseconds."""

    __slots__ = ("path", "_sock", "_buf", "_recv_ms", "__weakref__")

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        """The owner's unix socket."""
        self._sock: socket.socket | None = sock
        self._buf = FrameBuffer()
        """Bytes received and not yet returned: the start of the next reply, or more."""
        self._recv_ms = 0
        """The SO_RCVTIMEO set now, in ms (0: none yet)."""

    @classmethod
    def connect(cls, path: str) -> UnixStream | None:
        """A connection to the owner listening on ``path``; None at once when there is none
        (``unix_wire.connect``)."""
        sock = unix_wire.connect(path)
        if sock is None:
            return None
        sock.setblocking(True)
        return cls(path, sock)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def send(self, frame: bytes, wait_ms: int) -> None:
        """Send ``frame`` behind its length, waiting up to ``wait_ms`` for room in the stream;
        StreamBroken if the connection is closed or broke, or the frame did not all go out in
        time (the stream then holds part of it: it is closed)."""
        sock = self._sock
        if sock is None:
            raise StreamBroken(f"{self.path}: the connection is closed")
        data = pack(frame)
        try:
            sent = sock.send(data, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._broken(f"send: {exc}") from None
        if sent < len(data):
            self._send_rest(sock, memoryview(data)[sent:], wait_ms)

    def _send_rest(self, sock: socket.socket, rest: memoryview, wait_ms: int) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval_ms(max(1, wait_ms)))
        try:
            sock.sendall(rest, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            raise self._broken(f"a frame was only partly sent within {wait_ms} ms") from None
        except OSError as exc:
            raise self._broken(f"send: {exc}") from None

    def recv(self, wait_ms: int) -> bytes | None:
        """The next reply frame, waiting up to about ``wait_ms`` (at least 1) for it; None if
        it did not all arrive in that time (what did is kept for the next call).
        StreamBroken if the connection is closed, the owner closed it or it broke."""
        frame = self._take()
        if frame is not None:
            return frame
        sock = self._sock
        if sock is None:
            raise StreamBroken(f"{self.path}: the connection is closed")
        wait_ms = max(1, wait_ms)
        if wait_ms != self._recv_ms:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval_ms(wait_ms))
            self._recv_ms = wait_ms
        while True:
            try:
                chunk = sock.recv(self._buf.ask())
            except BlockingIOError:  # SO_RCVTIMEO ran out
                return None
            except OSError as exc:
                raise self._broken(f"recv: {exc}") from None
            if not chunk:
                raise self._broken("the owner closed the connection")
            self._buf.add(chunk)
            frame = self._take()
            if frame is not None:
                return frame

    def _take(self) -> bytes | None:
        """The first frame buffered, if it is all there."""
        try:
            return self._buf.take()
        except FrameTooLong as exc:
            raise self._broken(str(exc)) from None

    def _broken(self, why: str) -> StreamBroken:
        self.close()
        return StreamBroken(f"{self.path}: {why}")

    def shutdown(self) -> None:
        """End the connection for every user of it, as from another thread: the owner sees it
        closed, and this side's next send or recv finds it broken (and closes it). Never in a
        forked child on a connection of the parent: that ends the parent's too."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile, or the owner had closed it

    def close(self) -> None:
        """Close the connection (any replies buffered are dropped); closing again does
        nothing. In a forked child it closes only the child's copy of the descriptor."""
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._buf.clear()
            sock.close()
