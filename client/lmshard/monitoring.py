"""Shard statistics: the ``stat.<shard>`` message, following it, and ``lmshard stats`` / ``top``.

    lmshard stats [--json] [--direct] [-c CONFIG]    one look at every shard (table or JSON)
    lmshard top [--once] [--interval S] [-c CONFIG]  a live view, refreshed every S seconds

Every shard owner publishes one message every ``monitor.stats_interval`` seconds on a PUB socket
bound at ``shard.stat_endpoint`` (``lmshardd.stats`` builds it; :data:`MESSAGE` is the spec).
Anything that wants the numbers subscribes: ``lmshardd monitor`` (Prometheus ``/metrics`` and
JSON ``/stats``), ``lmshard top``, and ``lmshard stats`` when no monitor answers on
``monitor.endpoint``. A :class:`StatsBoard` keeps the latest message and a short history per
shard; a shard whose messages stop is *stale* (``up`` false, ``age`` growing), never shown as
zeros. Exit status of ``stats``: 0 every shard reports, 1 some shard is stale or silent,
2 bad usage or config.

This module is on the client side so the CLI and the daemon share one definition of the
message; the daemon imports it, never the other way (rich is imported only by ``top``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import zmq

from lmshard import security
from lmshard.config import ENV_VAR, Config, ConfigError, load_config

FORMAT_VERSION = 1
"""The ``v`` field of a stats message; a subscriber ignores messages of another version."""
TOPIC_PREFIX = b"stat."
"""A message's first frame is this plus the shard number in decimal: ``stat.3``."""
ENV_SWITCH = "LMSHARD_STATS"
"""Set to 0 (or off/false/no) in an owner's environment to switch its stats publishing off."""
MAX_MESSAGE_BYTES = 1 << 20
"""Subscribers drop larger messages (ZeroMQ MAXMSGSIZE); a message is about 1 KiB + tables."""
STALE_INTERVALS = 3.0
"""A shard is stale once no message arrived for this many stats intervals."""
HISTORY = 120
"""Messages kept per shard for the short history (2 minutes at the default 1 s interval)."""
COLLECT_INTERVALS = 1.5
"""``lmshard stats`` and ``top --once`` listen this many intervals for shards to report."""
COLLECT_SLACK = 0.3
"""Seconds added to that wait: subscribing and connecting take a moment."""
MONITOR_REQUEST = b"stats"
"""The request ``lmshardd monitor`` answers on ``monitor.endpoint`` with its snapshot."""
MONITOR_TIMEOUT_MS = 500
"""How long ``lmshard stats`` waits for the monitor before it subscribes to the shards itself."""
WARN_FRACTION = 0.8
"""``top`` colours map use and reader slots above this fraction of their limits."""
ALERT_FRACTION = 0.95
"""... and in red above this one."""
SUB_HWM = 100
"""Messages a subscriber queues per shard before ZeroMQ drops new ones."""
EXIT_STALE = 1
"""``lmshard stats`` exit status when some shard is stale or never reported."""

MESSAGE = """\
A stats message is two frames: the topic ``stat.<shard>`` and a msgpack map (fields below, in
MESSAGE_FIELDS). Counters are cumulative since the owner started; rates and quantiles cover the
``window`` seconds since the owner's previous message (quantile fields are nil when no commit
happened in the window)."""

MESSAGE_FIELDS: tuple[tuple[str, str], ...] = (
    ("v, shard, pid, seq", "format version (1), shard number, owner pid, message number from 0"),
    ("time, started, uptime", "unix time sent, unix time the owner started, seconds since"),
    ("interval, window", "configured seconds between messages, seconds this message covers"),
    ("ops, batches", "write ops committed, write batches committed (acked without error)"),
    ("failed_batches, duplicate_batches",
     "batches answered with an error; retried batches answered again without applying them"),
    ("commits, reads, bad_frames", "group commits, read/ping/stats requests, frames refused"),
    ("rates", "per second over the window: writes (ops), batches, failed, commits"),
    ("commit_seconds", "group commit duration: p50, p99, max over the window; sum over all"),
    ("group_size", "batches per group commit: p50, p99, max over the window"),
    ("ops_per_batch", "ops per batch: p50, p99, max over the window (a commit counts each of its "
     "batches at the commit's mean)"),
    ("queue_depth, queue_depth_max", "batches drained into the window's last commit (0 without "
     "a commit; ZeroMQ cannot count waiting messages), and the most drained into one commit"),
    ("map_size, map_used, max_map_size, page_size",
     "LMDB map size now, bytes in use, the size the owner may grow it to, page size"),
    ("readers_used, readers_active, max_readers", "reader slots held (by live processes, or "
     "crashed ones until reader_check frees them), of those in a read transaction, the limit"),
    ("tables", "table name -> rows"),
    ("last_txn_id, last_commit_time", "last committed transaction id, unix time of that commit"),
    ("dropped, publish_seconds",
     "messages the owner could not queue (counted, never waited for), seconds building this one"),
)
"""The stats message's fields (docs/monitoring.md lists them from here)."""


# --------------------------------------------------------------------------------------------
# The message
# --------------------------------------------------------------------------------------------


def topic(shard: int) -> bytes:
    """The topic frame of ``shard``'s stats messages."""
    return TOPIC_PREFIX + str(shard).encode()


def encode(shard: int, body: dict[str, Any]) -> list[bytes]:
    """The frames to publish for ``body`` (see :data:`MESSAGE`)."""
    return [topic(shard), msgpack.packb(body, use_bin_type=True)]


def decode(frames: list[bytes], shard: int | None = None) -> dict[str, Any]:
    """Validate and unpack one message; ValueError says what was wrong.

    ``shard``, when given, is the shard whose endpoint the frames came from: a message naming
    another shard is refused.
    """
    if len(frames) != 2:
        raise ValueError(f"expected 2 frames (topic, body), got {len(frames)}")
    head, payload = frames
    number = head[len(TOPIC_PREFIX):]
    if not head.startswith(TOPIC_PREFIX) or not number.isdigit() or len(number) > 4:
        raise ValueError(f"bad topic {head[:40]!r}")
    n = int(number)
    if shard is not None and n != shard:
        raise ValueError(f"topic names shard {n}, the endpoint is shard {shard}'s")
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise ValueError(f"body is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"body is a {type(body).__name__}, expected a map")
    if body.get("v") != FORMAT_VERSION:
        raise ValueError(f"format version {body.get('v')!r}, expected {FORMAT_VERSION}")
    if body.get("shard") != n:
        raise ValueError(f"body names shard {body.get('shard')!r}, the topic {n}")
    for name in _COUNTS:
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"field {name!r} is {value!r}, expected an integer >= 0")
    for name in _NUMBERS:
        if not _is_number(body.get(name)):
            raise ValueError(f"field {name!r} is {body.get(name)!r}, expected a number")
    for name, nullable in (("rates", False), ("commit_seconds", True), ("group_size", True),
                           ("ops_per_batch", True)):
        value = body.get(name)
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and (_is_number(v) or (nullable and v is None))
                for k, v in value.items()):
            raise ValueError(f"field {name!r} is {value!r:.80}, expected a map of numbers")
    tables = body.get("tables")
    if not isinstance(tables, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in tables.items()):
        raise ValueError(f"field 'tables' is {tables!r:.80}, expected table name -> rows")
    return body


_COUNTS = ("seq", "pid", "ops", "batches", "failed_batches", "duplicate_batches", "commits",
           "reads", "bad_frames", "queue_depth", "queue_depth_max", "map_size", "map_used",
           "max_map_size", "page_size", "readers_used", "readers_active", "max_readers",
           "last_txn_id", "dropped")
_NUMBERS = ("time", "started", "uptime", "interval", "window", "last_commit_time",
            "publish_seconds")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def stats_enabled(environ: dict[str, str] | None = None) -> bool:
    """False when :data:`ENV_SWITCH` switches publishing off."""
    value = (os.environ if environ is None else environ).get(ENV_SWITCH, "1")
    return value.strip().lower() not in ("0", "off", "false", "no")


# --------------------------------------------------------------------------------------------
# The latest state of every shard
# --------------------------------------------------------------------------------------------


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
        return all(st.last is not None for st in self.shards)

    def snapshot(self, now: float | None = None, *, history: bool = True) -> dict[str, Any]:
        """Every shard's state as plain data (JSON and msgpack safe): the ``/stats`` document."""
        now = self.clock() if now is None else now
        shards = []
        for st in self.shards:
            age = now - (st.received if st.received is not None else self.started)
            up = st.received is not None and age <= self.stale_after
            entry: dict[str, Any] = {
                "shard": st.shard,
                "endpoint": st.endpoint,
                "up": up,
                "seen": st.last is not None,
                "age": round(age, 3),
                "messages": st.messages,
                "restarts": st.restarts,
                "stats": st.last,
            }
            if history:
                entry["history"] = list(st.history)
            shards.append(entry)
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


# --------------------------------------------------------------------------------------------
# Following the shards
# --------------------------------------------------------------------------------------------


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
                endpoint = config.stat_endpoint(n)
                sock: zmq.Socket[bytes] = self.ctx.socket(zmq.SUB)
                self.socks[sock] = n
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, SUB_HWM)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
                security.secure_client(sock, config, endpoint)
                sock.setsockopt(zmq.SUBSCRIBE, topic(n))
                sock.connect(endpoint)
                self.poller.register(sock, zmq.POLLIN)
        except BaseException:
            self.close()
            raise

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
                body = decode(frames, shard)
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
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * MAX_MESSAGE_BYTES)
        security.secure_client(sock, config, endpoint)
        sock.connect(endpoint)
        try:
            sock.send_multipart([b"", MONITOR_REQUEST], zmq.NOBLOCK)
        except zmq.Again:
            return None
        if not sock.poll(timeout_ms):
            return None
        frames = sock.recv_multipart()
        try:
            snap = msgpack.unpackb(frames[-1], raw=False)
        except Exception:
            return None
        if not isinstance(snap, dict) or not isinstance(snap.get("shards"), list):
            return None
        return snap
    finally:
        sock.close(linger=0)
        ctx.term()


def gather(config: Config, *, direct: bool = False) -> dict[str, Any]:
    """A snapshot from the monitor if one answers (unless ``direct``), else from the shards."""
    snap = None if direct else query_monitor(config)
    if snap is not None:
        snap["source"] = "monitor"
        return snap
    snap = collect(config).snapshot()
    snap["source"] = "direct"
    return snap


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"  # pragma: no cover


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _ms(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.2f}"


def _num(x: Any, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _fraction(used: Any, limit: Any) -> float | None:
    if not used or not limit:
        return 0.0 if limit else None
    return float(used) / float(limit)


def level(fraction: float | None) -> int:
    """0 fine, 1 warn (above WARN_FRACTION), 2 alert (above ALERT_FRACTION)."""
    if fraction is None or fraction <= WARN_FRACTION:
        return 0
    return 2 if fraction > ALERT_FRACTION else 1


def state_text(entry: dict[str, Any]) -> str:
    if entry["up"]:
        return "up"
    if not entry["seen"]:
        return f"NO DATA {format_seconds(entry['age'])}"
    return f"STALE {format_seconds(entry['age'])}"


COLUMNS = ("shard", "state", "writes/s", "batches/s", "ops/batch p50/p99", "commit ms p50/p99/max",
           "queue", "acked", "failed", "map used/size", "map %max", "readers", "rows", "txn",
           "uptime")
"""The per-shard columns of ``lmshard stats`` and ``lmshard top``."""


def shard_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One shard's cells (strings), plus ``map_level``/``readers_level`` for colouring.

    A stale shard keeps its last known counters, sizes and rows, but not its rates, quantiles
    and queue depth: those describe a window that is over.
    """
    s = entry.get("stats") or {}
    have = bool(s)
    live = have and entry["up"]
    rates = (s.get("rates") or {}) if live else {}
    lat = (s.get("commit_seconds") or {}) if live else {}
    opb = (s.get("ops_per_batch") or {}) if live else {}
    map_frac = _fraction(s.get("map_used"), s.get("max_map_size"))
    rd_frac = _fraction(s.get("readers_used"), s.get("max_readers"))
    cells = {
        "shard": str(entry["shard"]),
        "state": state_text(entry),
        "writes/s": _num(rates.get("writes")),
        "batches/s": _num(rates.get("batches")),
        "ops/batch p50/p99": (f"{_num(opb.get('p50'))}/{_num(opb.get('p99'))}"
                              if live else "-"),
        "commit ms p50/p99/max": (f"{_ms(lat.get('p50'))}/{_ms(lat.get('p99'))}/"
                                  f"{_ms(lat.get('max'))}" if live else "-"),
        "queue": (f"{s.get('queue_depth', 0)} (max {s.get('queue_depth_max', 0)})"
                  if live else "-"),
        "acked": _num(s.get("batches")),
        "failed": _num(s.get("failed_batches")),
        "map used/size": (f"{format_bytes(s.get('map_used'))}/{format_bytes(s.get('map_size'))}"
                          if have else "-"),
        "map %max": "-" if map_frac is None else f"{map_frac * 100:.1f}%",
        "readers": (f"{s.get('readers_used', 0)}/{s.get('max_readers', 0)}" if have else "-"),
        "rows": _num(sum((s.get("tables") or {}).values()) if have else None),
        "txn": _num(s.get("last_txn_id"), "d"),
        "uptime": format_seconds(s.get("uptime")) if live else "-",
    }
    return {"cells": cells, "map_level": level(map_frac), "readers_level": level(rd_frac),
            "up": entry["up"], "seen": entry["seen"]}


def totals(snap: dict[str, Any]) -> dict[str, float]:
    """Sums over the shards that are up: writes/s, batches/s, ops, acked and failed batches."""
    out = {"writes": 0.0, "batches": 0.0, "ops": 0.0, "acked": 0.0, "failed": 0.0}
    for entry in snap["shards"]:
        s = entry.get("stats")
        if not entry["up"] or not s:
            continue
        out["writes"] += s["rates"].get("writes") or 0
        out["batches"] += s["rates"].get("batches") or 0
        out["ops"] += s.get("ops", 0)
        out["acked"] += s.get("batches", 0)
        out["failed"] += s.get("failed_batches", 0)
    return out


def table_rows(snap: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows per table and shard: (table names, one row of counts per shard, "-" if unknown)."""
    names: list[str] = []
    for entry in snap["shards"]:
        for name in (entry.get("stats") or {}).get("tables") or {}:
            if name not in names:
                names.append(name)
    rows = []
    for entry in snap["shards"]:
        tables = (entry.get("stats") or {}).get("tables")
        rows.append([str(entry["shard"])] + [
            "-" if tables is None or name not in tables else f"{tables[name]:,}"
            for name in names])
    return names, rows


def headline(snap: dict[str, Any]) -> str:
    t = totals(snap)
    where = snap.get("config") or "(no file)"
    return (f"lmshard {where}: {snap['shards_up']}/{snap['shards_total']} shards up, "
            f"{t['writes']:,.0f} writes/s, {t['batches']:,.0f} batches/s "
            f"(interval {snap['interval']:g}s, stale after {snap['stale_after']:g}s, "
            f"from {snap.get('source', 'direct')}) at {time.strftime('%H:%M:%S')}")


def _plain_table(header: Iterable[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` to the left, the others (numbers) to the right."""
    header = list(header)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < left else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def render_text(snap: dict[str, Any]) -> str:
    """The plain table ``lmshard stats`` prints."""
    lines = [headline(snap), ""]
    rows = [[shard_row(e)["cells"][c] for c in COLUMNS] for e in snap["shards"]]
    lines += _plain_table(COLUMNS, rows, left=2)
    names, trows = table_rows(snap)
    if names:
        lines += ["", "rows per table"]
        lines += _plain_table(["shard", *names], trows)
    return "\n".join(lines)


_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int = 16) -> str:
    vals = [v for v in values[-width:] if v is not None]
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return _SPARK[0] * len(vals)
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))]
                   for v in vals)


_LEVEL_STYLE = ("", "bold yellow", "bold red")
_GAP = 2
"""Spaces between two columns of ``top``'s tables (one cell of padding on either side)."""


Justify = Literal["left", "right"]


@dataclass(frozen=True)
class TopColumn:
    """One column of ``lmshard top``'s shard table (see :data:`TOP_COLUMNS`)."""

    header: str
    width: int
    """Cells the column keeps even when its content is narrower (a steady layout)."""
    priority: int
    """0 is the last column dropped as the terminal narrows; the highest number goes first."""
    cell: Callable[[dict[str, Any], dict[str, Any]], str]
    """The cell's text, from the snapshot's entry and its :func:`shard_row`."""
    style: Callable[[dict[str, Any]], str] | None = None
    """The cell's style, from the :func:`shard_row`."""
    justify: Justify = "right"


def _cells(name: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    return lambda entry, row: str(row["cells"][name])


def _trend(entry: dict[str, Any], row: dict[str, Any]) -> str:
    return sparkline([h.get("writes") for h in entry.get("history") or []])


TOP_COLUMNS: tuple[TopColumn, ...] = (
    TopColumn("shard", 5, 0, _cells("shard"), justify="left"),
    TopColumn("state", 12, 1, _cells("state"), justify="left",
              style=lambda row: "green" if row["up"] else "bold red"),
    TopColumn("writes/s", 8, 2, _cells("writes/s")),
    TopColumn("batches/s", 9, 3, _cells("batches/s")),
    TopColumn("ops/batch p50/p99", 17, 10, _cells("ops/batch p50/p99")),
    TopColumn("commit ms p50/p99/max", 21, 4, _cells("commit ms p50/p99/max")),
    TopColumn("queue", 9, 8, _cells("queue")),
    TopColumn("acked", 6, 9, _cells("acked")),
    TopColumn("failed", 6, 7, _cells("failed")),
    TopColumn("map used/size", 15, 12, _cells("map used/size")),
    TopColumn("map %max", 8, 5, _cells("map %max"),
              style=lambda row: _LEVEL_STYLE[row["map_level"]]),
    TopColumn("readers", 7, 6, _cells("readers"),
              style=lambda row: _LEVEL_STYLE[row["readers_level"]]),
    TopColumn("rows", 7, 13, _cells("rows")),
    TopColumn("txn", 5, 14, _cells("txn")),
    TopColumn("uptime", 6, 11, _cells("uptime")),
    TopColumn("writes/s trend", 16, 15, _trend, justify="left"),
)
"""``lmshard top``'s shard table, in display order: every column of :data:`COLUMNS` and the
trend. On a narrow terminal whole columns are dropped, highest ``priority`` first, until the
rest fits; a header is never shortened. At 80 columns shard, state, writes/s, batches/s, commit
latency and map %max remain."""


def fit_columns(widths: list[int], priorities: list[int], available: int,
                keep: int = 1) -> list[int]:
    """Which columns fit in ``available`` cells (their indices, in display order).

    Columns are taken by priority (lowest number first) while they fit, ``_GAP`` cells apart;
    the first column that does not fit ends the choice, so what is shown is always the most
    important ones. The ``keep`` most important are shown even if they do not fit.
    """
    chosen: list[int] = []
    used = -_GAP
    for rank, i in enumerate(sorted(range(len(widths)), key=lambda i: priorities[i])):
        if rank >= keep and used + _GAP + widths[i] > available:
            break
        used += _GAP + widths[i]
        chosen.append(i)
    return sorted(chosen)


def _fixed_table(headers: list[str], justify: list[Justify], widths: list[int], **kw: Any) -> Any:
    """A borderless table whose columns are exactly ``widths`` wide (no squeezing, no …)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, _GAP // 2), **kw)
    for header, just, width in zip(headers, justify, widths, strict=True):
        table.add_column(header, justify=just, width=width, min_width=width,
                         overflow="fold")
    return table


def shard_table(snap: dict[str, Any], width: int) -> Any:
    """``top``'s shard table for a terminal ``width`` cells wide (see :data:`TOP_COLUMNS`)."""
    from rich.cells import cell_len
    from rich.text import Text

    rows = [(entry, shard_row(entry)) for entry in snap["shards"]]
    texts = [[col.cell(entry, row) for col in TOP_COLUMNS] for entry, row in rows]
    widths = [max([col.width, cell_len(col.header), *(cell_len(t[i]) for t in texts)])
              for i, col in enumerate(TOP_COLUMNS)]
    shown = fit_columns(widths, [col.priority for col in TOP_COLUMNS], width, keep=2)
    table = _fixed_table([TOP_COLUMNS[i].header for i in shown],
                         [TOP_COLUMNS[i].justify for i in shown], [widths[i] for i in shown])
    for (_entry, row), cells in zip(rows, texts, strict=True):
        styled = []
        for i in shown:
            style = TOP_COLUMNS[i].style
            styled.append(Text(cells[i], style=style(row) if style else ""))
        table.add_row(*styled, style="" if row["up"] else "dim")
    return table


def rows_table(snap: dict[str, Any], width: int) -> list[Any]:
    """``top``'s rows per table and shard, as many tables as fit ``width``; [] without tables."""
    from rich.cells import cell_len
    from rich.text import Text

    names, trows = table_rows(snap)
    if not names:
        return []
    headers = ["shard", *names]
    widths = [max([cell_len(h), *(cell_len(r[i]) for r in trows)])
              for i, h in enumerate(headers)]
    shown = fit_columns(widths, list(range(len(headers))), width, keep=2)
    justify: list[Justify] = ["left" if i == 0 else "right" for i in shown]
    table = _fixed_table([headers[i] for i in shown], justify, [widths[i] for i in shown],
                         title="rows per table", title_justify="left")
    for r in trows:
        table.add_row(*(r[i] for i in shown))
    parts: list[Any] = [Text(""), table]
    if len(shown) < len(headers):
        hidden = len(headers) - len(shown)
        parts.append(Text(f"{hidden} more table{'s' if hidden > 1 else ''} not shown at this "
                          "width (lmshard stats lists them)", style="dim"))
    return parts


class _AtWidth:
    """A renderable built when rendered, for the width there is then: a resized terminal gets
    a fitting layout at the next refresh."""

    def __init__(self, build: Callable[[int], Any]) -> None:
        self.build = build

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        from rich.console import Group

        yield Group(*self.build(options.max_width))


def render_top(snap: dict[str, Any]) -> Any:
    """One frame of ``lmshard top``: a rich renderable (headline, shard table, rows table),
    laid out for the console's width when it is printed."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [Text(headline(snap), style="bold"),
                        _AtWidth(lambda width: [shard_table(snap, width),
                                                *rows_table(snap, width)])]
    warn = [e["shard"] for e in snap["shards"]
            if max(shard_row(e)["map_level"], shard_row(e)["readers_level"])]
    if warn:
        parts.append(Text(f"shards {', '.join(map(str, warn))}: map or reader slots above "
                          f"{WARN_FRACTION:.0%} of their limit", style="bold yellow"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------

TOP_WIDTH = 200
"""Columns ``top --once`` renders when stdout is not a terminal (a terminal's own width else)."""


def cmd_stats(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    snap = gather(config, direct=args.direct)
    if args.json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        print(render_text(snap))
    return 0 if snap["shards_up"] == snap["shards_total"] else EXIT_STALE


def _console(file: Any = None) -> Any:
    from rich.console import Console

    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, width=None if tty else TOP_WIDTH, highlight=False)


def cmd_top(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    interval = args.interval if args.interval is not None else config.stats_interval
    if not interval > 0:
        raise ConfigError(f"--interval {interval!r}: expected seconds > 0")
    console = _console()
    if args.once:
        snap = collect(config).snapshot()
        console.print(render_top(snap))
        return 0
    from rich.live import Live

    board = StatsBoard(config)
    with StatsSubscriber(config) as sub, \
            Live(render_top(board.snapshot()), console=console, auto_refresh=False) as live:
        try:
            while True:
                sub.follow(board, interval)
                live.update(render_top(board.snapshot()), refresh=True)
        except KeyboardInterrupt:
            return 0


def add_parsers(sub: Any) -> None:
    """Register ``stats`` and ``top`` on the ``lmshard`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"lmshard config file (default: ${ENV_VAR}, "
                        "then ./config/lmshard.toml)")
    p = sub.add_parser(
        "stats", parents=[common], help="every shard's stats once, as a table or JSON",
        description="Ask the running monitor (monitor.endpoint) for every shard's stats; "
        "without one, subscribe to the shards for up to 1.5 stats intervals. Exit status 1 if "
        "a shard is stale or did not report.")
    p.add_argument("--json", action="store_true", help="print JSON (the monitor's /stats)")
    p.add_argument("--direct", action="store_true",
                   help="subscribe to the shards even if a monitor runs")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("top", parents=[common], help="live view of every shard's stats",
                       description="Subscribe to every shard's stats and show them, refreshed; "
                       "Ctrl-C quits.")
    p.add_argument("--once", action="store_true",
                   help="render one frame (after up to 1.5 intervals) and exit")
    p.add_argument("--interval", type=float, metavar="S",
                   help="seconds between refreshes (default: monitor.stats_interval)")
    p.set_defaults(func=cmd_top)


def main(argv: list[str] | None = None) -> int:
    """``python -m lmshard.monitoring stats|top ...``: the two commands without the full CLI."""
    ap = argparse.ArgumentParser(prog="lmshard", description="lmshard stats and top")
    add_parsers(ap.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
