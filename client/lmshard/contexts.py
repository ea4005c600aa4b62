"""A ZeroMQ context that a program may drop without closing: it never hangs the garbage collector.

pyzmq's ``Context.__del__`` destroys the context: it closes the sockets it tracks, then terms
it, and term waits until every socket of the context is closed. The context tracks its sockets
by weak reference. When a client that was never closed is collected as part of a reference
cycle, together with its context and sockets, the garbage collector clears those weak
references before it finalizes anything: the context's finalizer finds no socket to close, and
its term waits for sockets whose own finalizers only run after it returns. The process hangs in
whatever allocation started the collection. ``OwnedContext`` also keeps its sockets by strong
reference and closes each one still open before it terms.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq


class OwnedContext(zmq.Context):  # type: ignore[type-arg]
    """A ``zmq.Context`` whose collection closes the sockets it made (see the module doc)."""

    # pyzmq takes other attribute names for socket options: these are declared here.
    _owned: list[Any] | None = None
    _owned_lock: threading.Lock | None = None
    _prune_at = 64

    def socket(self, socket_type: int, **kwargs: Any) -> zmq.Socket[Any]:  # type: ignore[override]
        sock: zmq.Socket[Any] = super().socket(socket_type, **kwargs)
        if self._owned_lock is None:
            self._owned_lock = threading.Lock()
        with self._owned_lock:
            owned = self._owned
            if owned is None:
                owned = self._owned = []
            elif len(owned) >= self._prune_at:  # closed ones go; the list stays short
                owned[:] = [s for s in owned if not s.closed]
                self._prune_at = max(64, 2 * len(owned))
            owned.append(sock)
        return sock

    def __del__(self) -> None:
        for sock in self._owned or ():
            if not sock.closed:
                sock.close(linger=0)
        self._owned = None
        super().__del__()
