"""The owner's stats channel: a ``stat.<shard>`` message on a PUB socket every stats interval.

``make_channel`` is listed in ``lmshardd.channels.CHANNEL_FACTORIES``, so every owner publishes
unless ``LMSHARD_STATS=0`` is in its environment. The message is declared in ``lmshard.stats_wire``
(``STAT``); the body built here is packed through that declaration.

Publishing must never hold a commit up. ``after_commit`` runs on the commit path and only adds a
few numbers (every commit's latency, group size and ops go into a bounded sample that thins
itself out when a window has more commits than it holds). Everything else happens in ``tick``,
between group commits, once per interval: a few LMDB info calls, one short read transaction
for the row counts, a sort of the sample, and a send with ZMQ_NOBLOCK on a PUB socket with a
small high-water mark. A PUB socket drops messages for a subscriber whose queue is full rather
than block; ``zmq.Again`` (which PUB does not raise today) is counted as a drop too.

Queue depth: ZeroMQ does not tell how many messages wait in a socket (ZMQ_EVENTS only says
"at least one"), so the owner's queue is approximated by the number of batches the last group
commit drained (the group size; the owner drains everything waiting, up to MAX_GROUP).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import lmdb
import zmq

from lmshard import security, stats_wire

log = logging.getLogger("lmshardd.stats")

SNDHWM = 4
"""Messages queued per subscriber; a subscriber that falls behind loses messages, not the owner."""
MAX_SAMPLES = 4096
"""Commits sampled per window; past this every other sample is dropped and sampling halves."""
QUANTILES = (("p50", 0.5), ("p99", 0.99))
"""The quantiles published for commit latency, group size and ops per batch."""


def make_channel(owner: Any) -> StatsChannel | None:
    """A stats channel for ``owner``, or None when switched off (``LMSHARD_STATS=0``) or its
    endpoint cannot be bound (logged: the shard keeps serving writes without stats)."""
    if not stats_wire.stats_enabled():
        log.info("shard %d: stats publishing is off (%s=%s)", owner.shard,
                 stats_wire.ENV_SWITCH, os.environ.get(stats_wire.ENV_SWITCH))
        return None
    try:
        return StatsChannel(owner)
    except zmq.ZMQError as exc:
        log.error("shard %d: cannot publish stats on %s: %s; serving without stats",
                  owner.shard, owner.member.stat_endpoint, exc)
        return None


def _no_quantiles() -> dict[str, float | None]:
    out: dict[str, float | None] = {name: None for name, _ in QUANTILES}
    out["max"] = None
    return out


def quantiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank quantiles of ``values`` (None when empty), and their max."""
    if not values:
        return _no_quantiles()
    ordered = sorted(values)
    last = len(ordered) - 1
    out: dict[str, float | None] = {name: ordered[min(last, int(q * len(ordered)))]
                                    for name, q in QUANTILES}
    out["max"] = ordered[-1]
    return out


def weighted_quantiles(pairs: list[tuple[float, int]]) -> dict[str, float | None]:
    """Quantiles of values given as (value, weight) pairs, and their max."""
    pairs = [p for p in pairs if p[1] > 0]
    if not pairs:
        return _no_quantiles()
    pairs.sort()
    total = sum(w for _, w in pairs)
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        rank = q * total
        seen = 0
        for value, weight in pairs:
            seen += weight
            if seen > rank:
                out[name] = value
                break
        else:
            out[name] = pairs[-1][0]
    out["max"] = pairs[-1][0]
    return out


def map_health(env: Any, max_map_size: int) -> dict[str, Any]:
    """What a copy's ping says of its environment: last txn id, map size and use, reader
    slots (held now, as /metrics shows them; num_readers is only a high-water mark)."""
    info = env.info()
    psize = env.stat()["psize"]
    return {
        "txn_id": info["last_txnid"],
        "map_size": info["map_size"],
        "map_used": (info["last_pgno"] + 1) * psize,
        "max_map_size": max_map_size,
        "readers": reader_slots(env)[0],
        "readers_high_water": info["num_readers"],
        "max_readers": info["max_readers"],
    }


def reader_slots(env: lmdb.Environment) -> tuple[int, int]:
    """(slots held, slots in a read transaction) from LMDB's reader table.

    A slot stays held while its process keeps it for reuse (txn id "-"); slots of crashed
    processes count until ``reader_check()`` frees them.
    """
    held = active = 0
    for line in env.readers().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3:
            held += 1
            active += parts[2] != "-"
    return held, active


class StatsChannel:
    """Publishes ``owner``'s stats on its copy's stat endpoint (see the module doc)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.shard: int = owner.shard
        self.interval: float = owner.config.stats_interval
        self.topic = stats_wire.topic(self.shard)
        endpoint = owner.member.stat_endpoint
        sock: zmq.Socket[bytes] = owner.ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[6:]), mode=0o700, exist_ok=True)
        try:
            security.secure_server(sock, owner.config, endpoint)
            sock.bind(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        self.sock: zmq.Socket[bytes] | None = sock
        self.endpoint = endpoint
        self.seq = 0
        self.dropped = 0
        self.commit_seconds_sum = 0.0
        self._due = 0.0  # the first tick publishes: a new owner shows up at once
        self._reset_window(time.monotonic())
        log.info("shard %d publishing stats on %s every %g s", self.shard, endpoint,
                 self.interval)

    def _reset_window(self, now: float) -> None:
        c = self.owner.counters
        self._window_start = now
        self._base = (c.ops, c.batches, c.failed_batches, c.commits)
        self._samples: list[tuple[float, int, int]] = []
        self._stride = 1
        self._skip = 1
        self._max_seconds = 0.0
        self._max_group = 0
        self._last_group = 0

    # -- the Channel protocol ----------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return []  # PUB has nothing to read

    def on_readable(self, sock: zmq.Socket[bytes]) -> None:  # pragma: no cover - never polled
        pass

    def after_commit(self, batches: int, ops: int, seconds: float) -> None:
        self.commit_seconds_sum += seconds
        self._last_group = batches
        if batches > self._max_group:
            self._max_group = batches
        if seconds > self._max_seconds:
            self._max_seconds = seconds
        self._skip -= 1
        if self._skip:
            return
        self._skip = self._stride
        self._samples.append((seconds, batches, ops))
        if len(self._samples) >= MAX_SAMPLES:
            # A uniform sample of the window in bounded memory: keep every other one, and
            # from now on take every (2 * stride)-th commit.
            del self._samples[::2]
            self._stride *= 2
            self._skip = self._stride

    def tick(self, now: float) -> None:
        if now >= self._due:
            self.publish(now)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[6:])
                except FileNotFoundError:
                    pass

    # -- publishing --------------------------------------------------------------------------

    def publish(self, now: float) -> None:
        """Send one message covering the window since the last one, and start a new window."""
        started = time.perf_counter()
        body = self.message(now)
        body["publish_seconds"] = time.perf_counter() - started
        if self.sock is not None:
            try:
                self.sock.send_multipart(stats_wire.encode(self.shard, body), zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
        self.seq += 1
        self._reset_window(now)
        # Fixed steps keep a steady rhythm; after a stall the next one is a full interval away.
        due = self._due + self.interval
        self._due = due if due > now else now + self.interval

    def message(self, now: float) -> dict[str, Any]:
        """The stats message body for the window ending ``now`` (monotonic)."""
        owner = self.owner
        c = owner.counters
        env: lmdb.Environment = owner.env
        window = max(now - self._window_start, 1e-9)
        ops0, batches0, failed0, commits0 = self._base
        samples = self._samples
        info = env.info()
        psize = env.stat()["psize"]
        held, active = reader_slots(env)
        with env.begin() as txn:
            tables = {b.name: txn.stat(b.db)["entries"] for b in owner.tables.by_tid.values()}
        latency = quantiles([s[0] for s in samples])
        if samples:
            latency["max"] = self._max_seconds
        group = quantiles([float(s[1]) for s in samples])
        if samples:
            group["max"] = self._max_group
        wall = time.time()
        return {
            "v": stats_wire.FORMAT_VERSION,
            "shard": self.shard,
            "pid": os.getpid(),
            "seq": self.seq,
            "time": wall,
            "started": c.started,
            "uptime": wall - c.started,
            "interval": self.interval,
            "window": window,
            "ops": c.ops,
            "batches": c.batches,
            "failed_batches": c.failed_batches,
            "duplicate_batches": c.duplicate_batches,
            "commits": c.commits,
            "reads": c.reads,
            "bad_frames": c.bad_frames,
            "rates": {
                "writes": (c.ops - ops0) / window,
                "batches": (c.batches - batches0) / window,
                "failed": (c.failed_batches - failed0) / window,
                "commits": (c.commits - commits0) / window,
            },
            "commit_seconds": latency | {"sum": self.commit_seconds_sum},
            "group_size": group,
            "ops_per_batch": weighted_quantiles([(s[2] / s[1], s[1]) for s in samples if s[1]]),
            "queue_depth": self._last_group if c.commits > commits0 else 0,
            "queue_depth_max": self._max_group,
            "map_size": info["map_size"],
            "map_used": (info["last_pgno"] + 1) * psize,
            "max_map_size": owner.config.max_map_size,
            "page_size": psize,
            "readers_used": held,
            "readers_active": active,
            "max_readers": info["max_readers"],
            "tables": tables,
            "last_txn_id": info["last_txnid"],
            "last_commit_time": c.last_commit_time,
            "changes": owner.changes_stats(),
            "epoch": owner.state.epoch,
            "replication": owner.replication_stats(info["last_txnid"]),
            "dropped": self.dropped,
        }
