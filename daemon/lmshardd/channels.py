"""What a shard owner serves beside its request socket: stats publishing, backups, expiry.

Each is a ``Channel`` run in the owner's loop thread; ``CHANNEL_FACTORIES`` lists them, each
imported plainly from the module that implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import zmq

from lmshardd import backup, changes, expiry, stats


class Channel(Protocol):
    """Something an owner serves beside its write socket (stats publishing, backups).

    Channels run in the owner's loop thread: ``sockets()`` are polled with the write socket,
    ``on_readable`` is called when one has input, ``tick`` after every loop turn, and
    ``after_commit`` after each group commit. A channel may set ``owner.paused`` to hold
    write batches back (they wait in the socket) for a consistent cut.
    """

    def sockets(self) -> list[zmq.Socket[bytes]]: ...

    def on_readable(self, sock: zmq.Socket[bytes]) -> None: ...

    def tick(self, now: float) -> None: ...

    def after_commit(self, batches: int, ops: int, seconds: float) -> None: ...

    def close(self) -> None: ...


CHANNEL_FACTORIES: tuple[Callable[[Any], Channel | None], ...] = (
    stats.make_channel, backup.make_channel, expiry.make_channel, changes.make_channel)
"""What every owner serves beside its request socket: stats publishing, backups, expiry of
old client records, the change log. Each factory gives the owner's channel, or None when it
is off."""
