"""An async client's plain unix stream connection to one shard owner (``lmshard.unix_wire``).

Beside a shard's DEALER (``lmshard.aio_owners``), driven by the same event loop: request
frames go out behind their length from the calling coroutine (what the socket does not take at
once is sent when it is writable, so the loop never blocks), and a reader callback takes the
reply frames as they come, in the owner's commit order, each handed to ``on_reply``. Many
requests are in flight on the one connection; replies are told apart by their sequence numbers.

The socket is a plain non-blocking one on the loop's ``add_reader`` (as the DEALER's file
descriptor is), not an asyncio transport: opening it is a non-blocking ``connect``, done by the
request that needs it, and the connection owns its descriptor, so a forked child closes its
copy without touching the parent's loop, and a connection of a loop already closed is closed
plainly.

A connection that breaks (the owner closed it, was killed or restarted: end of stream, a reset,
a broken pipe, or a reply longer than the limit) is closed and reported once to ``on_broken``,
which sends the requests in flight on it over ZeroMQ.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from lmshard import unix_wire
from lmshard.unix_wire import FrameBuffer, FrameTooLong, pack

_SEND_FLAGS = socket.MSG_NOSIGNAL


class AsyncUnixStream:
    """A non-blocking unix stream connection to an owner's socket on one event loop: request
    frames sent behind their length, reply frames handed to ``on_reply`` as they arrive."""

    __slots__ = ("path", "loop", "_sock", "_fd", "_buf", "_out", "_on_reply", "_on_broken")

    def __init__(self, path: str, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_reply: Callable[[bytes], None],
                 on_broken: Callable[[AsyncUnixStream, str], None]) -> None:
        self.path = path
        """The owner's unix socket."""
        self.loop = loop
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._buf = FrameBuffer()
        """Bytes received and not yet handed on: the start of the next reply."""
        self._out = bytearray()
        """Bytes the socket did not take yet (sent when it is writable)."""
        self._on_reply = on_reply
        self._on_broken = on_broken
        loop.add_reader(self._fd, self._read)

    @classmethod
    def connect(cls, path: str, loop: asyncio.AbstractEventLoop,
                on_reply: Callable[[bytes], None],
                on_broken: Callable[[AsyncUnixStream, str], None]) -> AsyncUnixStream | None:
        """A connection to the owner listening on ``path``, its replies read on ``loop``; None
        at once when there is none (``unix_wire.connect``)."""
        sock = unix_wire.connect(path)
        if sock is None:
            return None
        return cls(path, sock, loop, on_reply, on_broken)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def send(self, frame: bytes) -> None:
        """Send ``frame`` behind its length; what does not go out now is sent when the socket
        is writable. A connection found broken is closed and reported to ``on_broken`` (before
        this returns)."""
        sock = self._sock
        if sock is None:
            return
        data = pack(frame)
        if self._out:
            self._out += data
            return
        try:
            sent = sock.send(data, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken(f"send: {exc}")
            return
        if sent < len(data):
            self._out += memoryview(data)[sent:]
            self.loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._out, _SEND_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(f"send: {exc}")
            return
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self._fd)

    def _read(self) -> None:
        """What the owner sent (one recv: the reader is called again while more waits), each
        whole reply frame to ``on_reply``."""
        sock = self._sock
        if sock is None:
            return
        buf = self._buf
        try:
            chunk = sock.recv(buf.ask())
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(f"recv: {exc}")
            return
        if not chunk:
            self._broken("the owner closed the connection")
            return
        buf.add(chunk)
        on_reply = self._on_reply
        try:
            frames = buf.take_all()
        except FrameTooLong as exc:
            for frame in exc.frames:
                on_reply(frame)
            self._broken(str(exc))
            return
        for frame in frames:
            on_reply(frame)

    def _broken(self, why: str) -> None:
        self.close()
        self._on_broken(self, f"{self.path}: {why}")

    def close(self) -> None:
        """Close the connection (replies not read yet are dropped; ``on_broken`` is not
        called); closing again does nothing."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
            if self._out:
                self.loop.remove_writer(self._fd)
        self._out.clear()
        self._buf.clear()
        sock.close()

    def forget(self) -> None:
        """In a forked child: close this process's copy of the descriptor only. The loop's
        registration is the parent's (an epoll instance crosses fork shared): it is left
        alone."""
        sock = self._sock
        if sock is not None:
            self._sock = None
            sock.close()
