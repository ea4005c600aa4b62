"""A minimal follower of an owner's change log as a replica: REPLICATE, CREDIT and APPLIED over a
real DEALER socket on the owner's changes endpoint.

The owner-side tests of replication use it where they need what a real replica
(``lmshardd replica``, tested in tests/test_replica.py) never does on cue: say APPLIED exactly
when the test decides, late, never, or for a transaction it was not sent, follow under a name
that is not configured, or hold the raw records to inspect. It applies nothing.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from lmshard import security
from lmshard.changes_wire import (
    APPLIED,
    CHANGES,
    CREDIT,
    ERROR,
    PROGRESS,
    REPLICATE,
    STARTED,
    WATCH,
    Decoded,
    decode,
    pack,
)
from lmshard.config import Config


class Follower:
    """One follow of shard ``shard``'s log as replica ``name`` (or, ``watch()``, a plain
    watch of every table over the same wire, to compare)."""

    def __init__(self, config: Config, name: str = "b", shard: int = 0) -> None:
        endpoint = config.member(shard, "home").changes_endpoint
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, config, endpoint)
        sock.connect(endpoint)
        self.sock = sock
        self.name = name
        self.wid = 1
        self.history = ""
        self.changes: dict[int, tuple[list[int] | None, list[Any]]] = {}
        """What CHANGES brought, by txn: (indexes, effects)."""
        self.progress = 0

    def replicate(self, history: str = "", txn: int = 0, credit: int = 1000) -> Decoded:
        """Send REPLICATE; the answer (STARTED, COMPACTED or ERROR)."""
        self.sock.send(pack(REPLICATE, self.wid, self.name, history, txn, credit))
        return self._started()

    def watch(self, history: str = "", txn: int | None = 0, n: int = 0,
              credit: int = 1000) -> Decoded:
        """Send WATCH of every table; the answer."""
        self.sock.send(pack(WATCH, self.wid, history, txn, n, None, None, credit))
        return self._started()

    def _started(self) -> Decoded:
        msg = self.recv(10.0)
        assert msg is not None, "no answer to REPLICATE/WATCH"
        if msg.message is STARTED:
            self.history = msg.values[0]
        return msg

    def applied(self, txn: int) -> None:
        self.sock.send(pack(APPLIED, self.wid, txn))

    def recv(self, timeout: float) -> Decoded | None:
        """The next message within ``timeout`` seconds (CHANGES are kept in ``changes``);
        each CHANGES or PROGRESS is given back as credit at once."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = decode(self.sock.recv_multipart(), "owner", limit=None)
        if msg.message is CHANGES:
            assert msg.data is not None
            effects = msgpack.unpackb(msg.data, raw=False, use_list=True) if msg.data else []
            self.changes[msg.values[1]] = (msg.values[2], effects)
        elif msg.message is PROGRESS:
            self.progress = max(self.progress, msg.values[1])
        if msg.message in (CHANGES, PROGRESS):
            self.sock.send(pack(CREDIT, self.wid, 1))
        return msg

    def until(self, what: str, done: Any, timeout: float = 10.0) -> None:
        """Receive until ``done()`` is true; AssertionError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            msg = self.recv(min(left, 0.2))
            if msg is not None and msg.message is ERROR:
                raise AssertionError(f"the owner answered ERROR {msg.values}")

    def drain(self, seconds: float) -> None:
        """Receive whatever comes for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.recv(left)

    def close(self) -> None:
        self.sock.close(linger=0)
