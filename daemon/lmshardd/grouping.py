"""How long a group commit waits for more writers: who is writing, and a sub-millisecond wait.

A group commit that waits a moment before it begins lets the batches of other writers join it,
so one fsync serves them all. The wait only pays when more writers are coming: the owner counts
the clients that sent a batch recently (``ActiveWriters``) and stops waiting once the group holds
that many, or at a deadline of a fraction of a commit (``wait_readable`` wakes on the next
message, not at the end of a sleep).
"""

from __future__ import annotations

import select
import time
from typing import Any, Protocol

import zmq

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_FD_SETSIZE = 1024  # select() cannot wait on a higher descriptor


class ActiveWriters:
    """The clients that sent a write batch in the last ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._last: dict[bytes | None, float] = {}
        self._prune_due = 0.0

    def note(self, batches: list[tuple[Any, ...]], now: float) -> None:
        """Record the senders of ``batches`` (tuples whose second item is the client id)."""
        last = self._last
        for b in batches:
            last[b[1]] = now

    def count(self, now: float) -> int:
        if now >= self._prune_due:
            old = now - self.window
            self._last = {cid: t for cid, t in self._last.items() if t >= old}
            self._prune_due = now + self.window / 4
        return len(self._last)


class MoreInput(Protocol):
    """Plain sockets a group's wait also wakes for (the owner's unix-socket clients)."""

    def fds(self) -> list[int]:
        """Their descriptors now."""
        ...

    def take(self, readable: list[int]) -> bool:
        """Read those of ``readable`` that are theirs; whether a request came."""
        ...


def wait_readable(sock: zmq.Socket[bytes], timeout: float, more: MoreInput | None = None
                  ) -> bool:
    """Wait up to ``timeout`` seconds (sub-millisecond) for input on ``sock`` (or a request
    from ``more``); True if some.

    zmq_poll counts in whole milliseconds; this waits on the socket's ZMQ_FD with select(),
    which counts in microseconds. ZMQ_FD is edge-triggered: ZMQ_EVENTS is checked first (that
    also re-arms it), and a wake-up only means "look again".
    """
    deadline = time.monotonic() + timeout
    fd = int(sock.getsockopt(zmq.FD))
    while True:
        if int(sock.getsockopt(_EVENTS)) & _POLLIN:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        fds = [fd] if more is None else [fd, *more.fds()]
        if max(fds) < _FD_SETSIZE:
            readable, _, _ = select.select(fds, [], [], left)
            if more is not None and readable and more.take(readable):
                return True
        else:
            time.sleep(left)
