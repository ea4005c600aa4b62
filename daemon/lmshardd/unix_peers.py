"""An owner's plain unix stream socket: same-host clients' requests without ZeroMQ's threads.

``lmshard.unix_wire`` says why and what goes over it: the request and reply frames of the
ROUTER, each behind its length. ``UnixServer`` listens beside the owner's ROUTER, accepts
clients, cuts what they send into frames (``take``) for the owner's loop, which serves them
with the ROUTER's own code, and sends each reply back on its connection (``UnixPeer.send``),
keeping what the socket does not take at once until it is writable: the loop never blocks on a
slow or stopped client. A connection that sends a bad length, or closes, is dropped with the
replies it had not read, as a ROUTER drops a gone peer's.

Everything runs in the owner's loop thread; the sockets are registered on the loop's
``zmq.Poller`` (POLLIN, and POLLOUT while a peer has replies left to send).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import zmq

from lmshard.unix_wire import FrameBuffer, FrameTooLong, pack, unix_path

log = logging.getLogger("lmshardd.owner")

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
READ_SIZE = 256 * 1024
"""Most bytes read from one connection at a time."""


class UnixPeer:
    """One client connection: its socket, what came in short of a whole frame, what is left
    to send."""

    __slots__ = ("sock", "fd", "inbuf", "out", "server")

    def __init__(self, sock: socket.socket, server: UnixServer) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = FrameBuffer()
        self.out = bytearray()
        self.server: UnixServer | None = server

    def send(self, frame: bytes) -> None:
        """Send ``frame`` (a reply) behind its length; what the socket does not take now is
        sent when it is writable. A gone client's replies are dropped."""
        server = self.server
        if server is None:
            return
        data = pack(frame)
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            server.drop(self)
            return
        if n < len(data):
            self.out += data[n:]
            server.want_write(self)

    def flush(self) -> bool:
        """Send what is left; whether everything went (False too when the connection broke:
        the peer is dropped)."""
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return False
        except OSError:
            if self.server is not None:
                self.server.drop(self)
            return False
        del self.out[:n]
        return not self.out

    def read(self, frames: list[tuple[UnixPeer, bytes]]) -> bool:
        """Read what the client sent; each whole frame appended to ``frames`` as (this peer,
        frame). False when the connection is over (closed, reset, or a bad length)."""
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.inbuf.add(data)
        try:
            got = self.inbuf.take_all()
        except FrameTooLong as exc:  # the frames before the bad length are served
            frames.extend((self, frame) for frame in exc.frames)
            log.warning("dropped a unix-socket client: %s", exc)
            return False
        frames.extend((self, frame) for frame in got)
        return True


class UnixServer:
    """The owner's unix socket at ``path`` and its clients, on the loop's ``poller``."""

    def __init__(self, path: str, poller: zmq.Poller) -> None:
        self.path = path
        self.poller = poller
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file of an owner that was killed
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.listen_fd = self.listener.fileno()
        self.peers: dict[int, UnixPeer] = {}
        """Connected clients by descriptor."""
        self.frames: list[tuple[UnixPeer, bytes]] = []
        """Frames read and not yet served: (peer, frame)."""
        self.accepted = 0
        poller.register(self.listen_fd, _POLLIN)

    def on_ready(self, ready: dict[Any, int]) -> None:
        """Handle what the loop's poll found: new clients, frames, room to send."""
        peers = self.peers
        readable = []
        for fd, ev in ready.items():
            peer = peers.get(fd)
            if peer is None:
                continue
            if ev & _POLLOUT and peer.out and peer.flush():
                self.poller.modify(fd, _POLLIN)
            if ev & _POLLIN:
                readable.append(fd)
        if readable:
            self.take(readable)
        if self.listen_fd in ready:
            self._accept()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. out of descriptors: the client sees a refusal
                log.warning("unix socket %s: accept failed: %s", self.path, exc)
                return
            sock.setblocking(False)
            peer = UnixPeer(sock, self)
            self.peers[peer.fd] = peer
            self.poller.register(peer.fd, _POLLIN)
            self.accepted += 1

    def want_write(self, peer: UnixPeer) -> None:
        if peer.fd in self.peers:
            self.poller.modify(peer.fd, _POLLIN | _POLLOUT)

    def drop(self, peer: UnixPeer) -> None:
        """Close a client's connection; its unsent replies are dropped."""
        if self.peers.pop(peer.fd, None) is not None:
            self.poller.unregister(peer.fd)
        peer.server = None
        peer.out.clear()
        peer.sock.close()

    def fds(self) -> list[int]:
        """The clients' descriptors (``grouping.MoreInput``: a group's wait wakes for them)."""
        return list(self.peers)

    def take(self, readable: list[int]) -> bool:
        """Read the clients among ``readable`` (frames kept in ``frames``); whether a whole
        request came."""
        before = len(self.frames)
        for fd in readable:
            peer = self.peers.get(fd)
            if peer is not None and not peer.read(self.frames):
                self.drop(peer)
        return len(self.frames) > before

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self.drop(peer)
        with contextlib.suppress(KeyError):
            self.poller.unregister(self.listen_fd)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def make_server(config: Any, endpoint: str, poller: zmq.Poller) -> UnixServer | None:
    """The unix socket beside the ROUTER at ``endpoint`` when ``shard.unix_socket`` is on and
    the endpoint is ipc (None otherwise, or when it cannot be bound: clients then use ZeroMQ)."""
    path = unix_path(endpoint) if config.unix_socket else None
    if path is None:
        return None
    try:
        return UnixServer(path, poller)
    except OSError as exc:
        log.warning("cannot listen on %s (%s): clients on this host use ZeroMQ only", path,
                    exc)
        return None
