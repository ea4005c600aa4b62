"""Following every shard's stats: a :class:`StatsBoard` of the latest message and a short
history per shard, the :class:`StatsSubscriber` that feeds it, and asking a running monitor
for its board instead.

Anything that wants the numbers uses these: ``lmshardd monitor`` (Prometheus ``/metrics`` and
JSON ``/stats``), ``lmshard top``, and ``lmshard stats`` when no monitor answers on
``monitor.endpoint``. A shard whose messages stop is *stale* (``up`` false, ``age`` growing),
never shown as zeros. The messages themselves are declared in ``lmshard.stats_wire``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from lmshard import security, stats_wire
from lmshard.config import Config

STALE_INTERVALS = 3.0
"""A shard is stale once no message arrived for this many stats intervals."""
HISTORY = 120
"""Messages kept per shard for the short history (2 minutes at the default 1 s interval)."""
COLLECT_INTERVALS = 1.5
"""``lmshard stats`` and ``top --once`` listen this many intervals for shards to report."""
COLLECT_SLACK = 0.3
"""Seconds added to that wait: subscribing and connecting take a moment."""
MONITOR_TIMEOUT_MS = 500
"""How long ``lmshard stats`` waits for the monitor before it subscribes to the shards itself."""
SUB_HWM = 100
"""Messages a subscriber queues per shard before ZeroMQ drops new ones."""


@dataclass
class ShardState:
    """What a board knows of one shard: its last message, when it came, a short history."""

    shard: int
    endpoint: str
    last: dict[str, Any] | None = None
    received: float | None = None  # monotonic, the receiver's clock
    messages: int = 0
    restarts: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))


class StatsBoard:
    """The latest message and a short history of every shard, and which shards are stale."""

    def __init__(self, config: Config, *, stale_after: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.interval = config.stats_interval
        self.stale_after = (stale_after if stale_after is not None
                            else STALE_INTERVALS * config.stats_interval)
        self.clock = clock
        self.started = clock()
        self.shards = [ShardState(n, config.stat_endpoint(n)) for n in range(config.shards)]
        self.bad_messages = 0

    def update(self, shard: int, body: dict[str, Any], now: float | None = None) -> None:
        """Take ``shard``'s message ``body`` (already decoded); a new pid or an earlier
        sequence number counts as a restart of its owner."""
        st = self.shards[shard]
        last = st.last
        if last is not None and (body.get("pid") != last.get("pid")
                                 or body.get("seq", 0) < last.get("seq", 0)):
            st.restarts += 1
        st.last = body
        st.received = self.clock() if now is None else now
        st.messages += 1
        rates = body.get("rates") or {}
        st.history.append({
            "time": body.get("time"),
            "writes": rates.get("writes"),
            "batches": rates.get("batches"),
            "commit_p99": (body.get("commit_seconds") or {}).get("p99"),
            "map_used": body.get("map_used"),
        })

    def seen_all(self) -> bool:
        """True once every shard has reported at least once."""
        return all(st.last is not None for st in self.shards)

    def snapshot(self, now: float | None = None, *, history: bool = True) -> dict[str, Any]:
        """Every shard's state as plain data (JSON and msgpack safe): the ``/stats`` document."""
        now = self.clock() if now is None else now
        shards = [self._entry(st, now, history) for st in self.shards]
        return {
            "time": time.time(),
            "config": str(self.config.path) if self.config.path else None,
            "shards_total": self.config.shards,
            "shards_up": sum(1 for s in shards if s["up"]),
            "interval": self.interval,
            "stale_after": self.stale_after,
            "bad_messages": self.bad_messages,
            "shards": shards,
        }

    def _entry(self, st: ShardState, now: float, history: bool) -> dict[str, Any]:
        """One shard's part of the snapshot."""
        age = now - (st.received if st.received is not None else self.started)
        entry: dict[str, Any] = {
            "shard": st.shard,
            "endpoint": st.endpoint,
            "up": st.received is not None and age <= self.stale_after,
            "seen": st.last is not None,
            "age": round(age, 3),
            "messages": st.messages,
            "restarts": st.restarts,
            "stats": st.last,
        }
        if history:
            entry["history"] = list(st.history)
        return entry


class StatsSubscriber:
    """One SUB socket per shard's stat endpoint; ``poll`` feeds what arrives into a board.

    One socket per shard, so a message is checked against the endpoint it came from, and CURVE
    settings apply per endpoint.
    """

    def __init__(self, config: Config, ctx: zmq.Context[Any] | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx: zmq.Context[Any] = zmq.Context() if ctx is None else ctx
        self.poller = zmq.Poller()
        self.socks: dict[zmq.Socket[bytes], int] = {}
        try:
            for n in range(config.shards):
                self._subscribe(config, n)
        except BaseException:
            self.close()
            raise

    def _subscribe(self, config: Config, shard: int) -> None:
        endpoint = config.stat_endpoint(shard)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.SUB)
        self.socks[sock] = shard
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, SUB_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, stats_wire.MAX_MESSAGE_BYTES)
        security.secure_client(sock, config, endpoint)
        sock.setsockopt(zmq.SUBSCRIBE, stats_wire.topic(shard))
        sock.connect(endpoint)
        self.poller.register(sock, zmq.POLLIN)

    def poll(self, board: StatsBoard, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for messages, take every one waiting; how many were good."""
        return sum(self.take(sock, board) for sock, _ in self.poller.poll(max(0, timeout_ms))
                   if sock in self.socks)

    def take(self, sock: zmq.Socket[bytes], board: StatsBoard) -> int:
        """Feed every message waiting on ``sock`` into ``board``; how many were good (the
        others are counted in ``board.bad_messages``)."""
        shard = self.socks[sock]
        good = 0
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return good
            try:
                body = stats_wire.decode(frames, shard)
            except ValueError:
                board.bad_messages += 1
                continue
            board.update(shard, body)
            good += 1

    def follow(self, board: StatsBoard, seconds: float, *, until_all: bool = False) -> None:
        """Feed ``board`` for ``seconds`` (less once every shard reported, if ``until_all``)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (until_all and board.seen_all()):
                return
            self.poll(board, int(left * 1000) + 1)

    def close(self) -> None:
        """Close every socket (and the context, if this subscriber made it)."""
        for sock in self.socks:
            sock.close(linger=0)
        self.socks = {}
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> StatsSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(config: Config, seconds: float | None = None) -> StatsBoard:
    """Subscribe to every shard until each has reported, or ``seconds`` (default 1.5 intervals)
    have passed; the board."""
    if seconds is None:
        seconds = COLLECT_INTERVALS * config.stats_interval + COLLECT_SLACK
    board = StatsBoard(config)
    with StatsSubscriber(config) as sub:
        sub.follow(board, seconds, until_all=True)
    return board


def query_monitor(config: Config, timeout_ms: int = MONITOR_TIMEOUT_MS) -> dict[str, Any] | None:
    """The running monitor's snapshot (see ``StatsBoard.snapshot``), or None if none answers."""
    endpoint = config.monitor_endpoint
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        return None
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, stats_wire.MAX_SNAPSHOT_BYTES)
        security.secure_client(sock, config, endpoint)
        sock.connect(endpoint)
        try:
            sock.send_multipart(stats_wire.monitor_request(), zmq.NOBLOCK)
        except zmq.Again:
            return None
        if not sock.poll(timeout_ms):
            return None
        try:
            return stats_wire.decode_snapshot(sock.recv_multipart()[-1])
        except ValueError:
            return None
    finally:
        sock.close(linger=0)
        ctx.term()
