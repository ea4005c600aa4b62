"""The stats channels' messages: a shard owner's ``stat.<shard>`` message and the monitor's
snapshot query, each declared once with ``lmshard.wire``.

Every shard owner publishes one ``stat`` message every ``monitor.stats_interval`` seconds on
a PUB socket bound at ``shard.stat_endpoint`` (``lmshardd.stats`` builds it with
:func:`encode`); every reader (``lmshardd monitor``, ``lmshard top``, ``lmshard stats``)
checks it with :func:`decode`. ``lmshardd monitor`` answers a ``snapshot_request`` on
``monitor.endpoint`` with its board (:func:`encode_snapshot`, :func:`decode_snapshot`).
``LMSHARD_STATS=0`` (:data:`ENV_SWITCH`) in an owner's environment switches its publishing off.

Both bodies are msgpack maps. A map-bodied message's ``wire.Field`` entries name its keys in
the order they are packed, with each value's check and meaning; packing and checking go through
that declaration (:func:`pack_map`, :func:`check_map`), and docs/monitoring.md lists the
fields from it (``python -m lmshard.stats_wire`` prints the table).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import msgpack

from lmshard import wire

FORMAT_VERSION = 1
"""The ``v`` field of a stats message; a subscriber ignores messages of another version."""
TOPIC_PREFIX = b"stat."
"""A message's first frame is this plus the shard number in decimal: ``stat.3``."""
MAX_TOPIC_DIGITS = 4
"""Shard numbers in a topic have at most this many digits."""
MAX_MESSAGE_BYTES = 1 << 20
"""Subscribers drop larger messages (ZeroMQ MAXMSGSIZE); a message is about 1 KiB + tables."""
ENV_SWITCH = "LMSHARD_STATS"
"""Set to 0 (or off/false/no) in an owner's environment to switch its stats publishing off."""
MONITOR_REQUEST = b"stats"
"""The request frame ``lmshardd monitor`` answers on ``monitor.endpoint`` with its snapshot."""
MAX_REQUEST_BYTES = 1024
"""The monitor drops larger requests (ZeroMQ MAXMSGSIZE)."""
MAX_SNAPSHOT_BYTES = 64 * MAX_MESSAGE_BYTES
"""Readers of the monitor drop larger replies: one message per shard and some history."""


# -- value checks --------------------------------------------------------------------------------


def number(v: Any) -> bool:
    """An int or a float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numbers(v: Any) -> bool:
    """A map of names to numbers."""
    return isinstance(v, dict) and all(isinstance(k, str) and number(x) for k, x in v.items())


def quantile_map(v: Any) -> bool:
    """A map of names to numbers or nil (nil: no commit in the window)."""
    return isinstance(v, dict) and all(isinstance(k, str) and (x is None or number(x))
                                       for k, x in v.items())


def row_counts(v: Any) -> bool:
    """A map of table names to row counts."""
    return isinstance(v, dict) and all(isinstance(k, str) and wire.uint(x) for k, x in v.items())


def shard_entries(v: Any) -> bool:
    """A list of maps, each with its shard number."""
    return isinstance(v, list) and all(isinstance(e, dict) and wire.uint(e.get("shard"))
                                       for e in v)


def a_map(v: Any) -> bool:
    """A map."""
    return isinstance(v, dict)


def replication_map(v: Any) -> bool:
    """The owner's replication numbers: a map whose ``replicas`` maps names to maps."""
    return isinstance(v, dict) and isinstance(v.get("replicas"), dict) and all(
        isinstance(k, str) and isinstance(r, dict) for k, r in v["replicas"].items())


# -- map bodies ----------------------------------------------------------------------------------


def pack_map(message: wire.Message, body: Mapping[str, Any]) -> bytes:
    """``body`` as a msgpack map of ``message``'s fields in their declared order.

    A missing or undeclared field is a ValueError: the sender builds the body, so this is a
    bug on the sending side, never something to send.
    """
    try:
        ordered = {f.name: body[f.name] for f in message.fields}
    except KeyError as exc:
        raise ValueError(f"{message.name}: no field {exc.args[0]!r}") from None
    if len(ordered) != len(body):
        extra = sorted(set(body) - set(ordered))
        raise ValueError(f"{message.name}: undeclared fields {extra}")
    packed: bytes = msgpack.packb(ordered, use_bin_type=True)
    return packed


def unpack_map(message: wire.Message, payload: bytes) -> dict[str, Any]:
    """The msgpack map in ``payload``, not yet checked; ValueError if it is none."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise ValueError(f"{message.name}: body is not msgpack: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{message.name}: body is a {type(body).__name__}, expected a map")
    return body


def check_map(message: wire.Message, body: dict[str, Any]) -> None:
    """ValueError naming the first of ``message``'s fields that ``body`` lacks or fails.

    Keys the declaration does not name are left alone: a newer sender may add fields.
    """
    missing = [f.name for f in message.fields if f.name not in body]
    if missing:
        raise ValueError(f"{message.name}: no field {missing[0]!r}")
    problem = message.check([body[f.name] for f in message.fields])
    if problem is not None:
        raise ValueError(problem)


def fields_markdown(message: wire.Message) -> str:
    """``message``'s doc and the table of its fields (docs/monitoring.md holds the ``stat``
    one)."""
    rows = [f"| `{f.name}` | {' '.join(f.doc.split())} |" for f in message.fields]
    return "\n".join([" ".join(message.doc.split()), "", "| field | meaning |", "|---|---|",
                      *rows]) + "\n"


# -- the owners' stats PUB channel ---------------------------------------------------------------

STATS = wire.channel(
    "stats",
    "Each shard owner publishes its numbers on a PUB socket bound at `shard.stat_endpoint`, "
    "one message every `monitor.stats_interval` seconds; `lmshardd monitor`, `lmshard top` "
    "and `lmshard stats` subscribe. A reader refuses a message with the wrong topic, shard, "
    "format version or field types (docs/monitoring.md).",
    "two frames, the topic `stat.<shard>` (the shard number in decimal) and one msgpack map of "
    "the fields by name. No code travels: the topic names the message.",
)

_F = wire.Field
STAT = STATS.declare(1, "stat", "owner", (
    _F("v", wire.uint, "format version (1)"),
    _F("shard", wire.uint, "shard number (the topic's)"),
    _F("pid", wire.uint, "owner pid"),
    _F("seq", wire.uint, "message number from 0"),
    _F("time", number, "unix time sent"),
    _F("started", number, "unix time the owner started"),
    _F("uptime", number, "seconds since the owner started"),
    _F("interval", number, "configured seconds between messages"),
    _F("window", number, "seconds this message covers"),
    _F("ops", wire.uint, "write ops committed"),
    _F("batches", wire.uint, "write batches committed (acked without error)"),
    _F("failed_batches", wire.uint, "batches answered with an error"),
    _F("duplicate_batches", wire.uint,
       "retried batches answered again without applying them"),
    _F("commits", wire.uint, "group commits"),
    _F("reads", wire.uint, "read, ping and stats requests"),
    _F("bad_frames", wire.uint, "frames refused"),
    _F("rates", numbers, "per second over the window: writes (ops), batches, failed, commits"),
    _F("commit_seconds", quantile_map,
       "group commit duration: p50, p99, max over the window; sum over all"),
    _F("group_size", quantile_map, "batches per group commit: p50, p99, max over the window"),
    _F("ops_per_batch", quantile_map, "ops per batch: p50, p99, max over the window (a commit "
       "counts each of its batches at the commit's mean)"),
    _F("queue_depth", wire.uint, "batches drained into the window's last commit (0 without a "
       "commit; ZeroMQ cannot count waiting messages)"),
    _F("queue_depth_max", wire.uint, "the most batches drained into one commit in the window"),
    _F("map_size", wire.uint, "LMDB map size now, bytes"),
    _F("map_used", wire.uint, "bytes of the map in use"),
    _F("max_map_size", wire.uint, "the size the owner may grow the map to"),
    _F("page_size", wire.uint, "LMDB page size"),
    _F("readers_used", wire.uint, "reader slots held (by live processes, or crashed ones until "
       "reader_check frees them)"),
    _F("readers_active", wire.uint, "reader slots in a read transaction"),
    _F("max_readers", wire.uint, "the reader slot limit"),
    _F("tables", row_counts, "table name -> rows"),
    _F("last_txn_id", wire.uint, "last committed transaction id"),
    _F("last_commit_time", number, "unix time of the last commit"),
    _F("changes", wire.optional(a_map), "the change log (nil when it is off): bytes, records, "
       "oldest_txn and newest_txn (nil when empty), floor, retain, retain_seconds, sent_changes, "
       "bad_frames, and watchers, a list of {watch, lag_txns, lag_seconds, credit, messages}"),
    _F("epoch", wire.optional(wire.uint), "the shard's epoch as this owner knows it (1, then +1 "
       "at every failover; nil from an owner before replicas)"),
    _F("replication", wire.optional(replication_map), "nil without replica.names: else "
       "required (durability.replicas), timeout, held (write acks waiting for replicas), "
       "timeouts (acks answered ReplicaTimeout, since the owner started), confirmed (the last "
       "txn enough replicas applied), and replicas, a map of replica name to {applied, "
       "lag_txns, lag_seconds, last_heard}"),
    _F("dropped", wire.uint, "messages the owner could not queue (counted, never waited for)"),
    _F("publish_seconds", number, "seconds the owner took to build this message"),
), """
One shard's numbers. Counters are cumulative since the owner started; rates and quantiles
cover the `window` seconds since the owner's previous message (quantile fields are nil when no
commit happened in the window).""")


def changes_summary(log: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The change log's numbers in a ``stat`` message's ``changes`` map (or the owner's
    ``ChangesChannel.stats()``), its watchers summed up: their number and the largest lag.
    None when the log is off. The monitor's ``lmshard_changes_*`` series and a ping's
    ``changes`` are these."""
    if not log:
        return None
    watchers = log.get("watchers") or []
    return {"bytes": log.get("bytes"), "records": log.get("records"),
            "oldest_txn": log.get("oldest_txn"), "watchers": len(watchers),
            "max_lag_txns": max((w.get("lag_txns", 0) for w in watchers), default=0),
            "max_lag_seconds": max((w.get("lag_seconds", 0.0) for w in watchers), default=0.0),
            "sent_changes": log.get("sent_changes", 0)}


def worst_replica(replication: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The replica furthest behind in a ``stat`` message's ``replication`` (by lag in
    seconds, then transactions), with its ``name``; None without replicas."""
    replicas = (replication or {}).get("replicas") or {}
    if not replicas:
        return None
    name, r = max(replicas.items(), key=lambda kv: (kv[1].get("lag_seconds", 0.0),
                                                    kv[1].get("lag_txns", 0)))
    return {"name": name, **r}


def stats_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when :data:`ENV_SWITCH` switches an owner's publishing off."""
    value = (os.environ if environ is None else environ).get(ENV_SWITCH, "1")
    return value.strip().lower() not in ("0", "off", "false", "no")


def topic(shard: int) -> bytes:
    """The topic frame of ``shard``'s stats messages."""
    return TOPIC_PREFIX + str(shard).encode()


LATER_FIELDS: dict[str, Any] = {"changes": None, "epoch": None, "replication": None}
"""``stat`` fields added after the first owners published: nil when a body lacks them (a reader
takes an older owner's message as if each were off; a sender may leave them out)."""


def encode(shard: int, body: Mapping[str, Any]) -> list[bytes]:
    """The frames to publish for ``body``, a ``stat`` message of ``shard`` (``LATER_FIELDS``
    it lacks are nil)."""
    return [topic(shard), pack_map(STAT, {**LATER_FIELDS, **body})]


def topic_shard(head: bytes) -> int:
    """The shard a topic frame names; ValueError if it is not a stats topic."""
    number_ = head[len(TOPIC_PREFIX):]
    if (not head.startswith(TOPIC_PREFIX) or not number_.isdigit()
            or len(number_) > MAX_TOPIC_DIGITS):
        raise ValueError(f"bad topic {head[:40]!r}")
    return int(number_)


def decode(frames: list[bytes], shard: int | None = None) -> dict[str, Any]:
    """Validate and unpack one ``stat`` message; ValueError says what was wrong.

    ``shard``, when given, is the shard whose endpoint the frames came from: a message naming
    another shard is refused.
    """
    if len(frames) != 2:
        raise ValueError(f"expected 2 frames (topic, body), got {len(frames)}")
    head, payload = frames
    n = topic_shard(head)
    if shard is not None and n != shard:
        raise ValueError(f"topic names shard {n}, the endpoint is shard {shard}'s")
    body = unpack_map(STAT, payload)
    if body.get("v") != FORMAT_VERSION:
        raise ValueError(f"format version {body.get('v')!r}, expected {FORMAT_VERSION}")
    if body.get("shard") != n:
        raise ValueError(f"body names shard {body.get('shard')!r}, the topic {n}")
    for name, default in LATER_FIELDS.items():  # an owner from before the change log, replicas
        body.setdefault(name, default)
    check_map(STAT, body)
    return body


# -- the monitor's query channel -----------------------------------------------------------------

MONITOR = wire.channel(
    "monitor",
    "`lmshardd monitor` answers on `monitor.endpoint` (a ROUTER, secured like every lmshard "
    "socket) with its board of every shard's stats: `lmshard stats` asks it before subscribing "
    "to the shards itself, `lmshard status` for the monitor's /metrics URL.",
    f"the asker's DEALER sends an empty delimiter frame and the {len(MONITOR_REQUEST)} bytes "
    f"`{MONITOR_REQUEST.decode()}` (not msgpack); "
    "the monitor answers on the same envelope with one msgpack map. No code travels: there is "
    "one request and one reply. A frame that is not the request gets no answer.",
)

SNAPSHOT_REQUEST = MONITOR.declare(1, "snapshot_request", "lmshard stats, lmshard status", (), """
Ask for the monitor's snapshot.""")

SNAPSHOT = MONITOR.declare(2, "snapshot", "monitor", (
    _F("time", number, "unix time of the snapshot"),
    _F("config", wire.optional(wire.text), "the monitor's config file, nil for none"),
    _F("shards_total", wire.uint, "shards in the config"),
    _F("shards_up", wire.uint, "shards whose last message is at most stale_after seconds old"),
    _F("interval", number, "monitor.stats_interval"),
    _F("stale_after", number, "seconds without a message before a shard counts as down"),
    _F("bad_messages", wire.uint, "stats messages refused"),
    _F("shards", shard_entries, "per shard: shard, endpoint, up, seen, age, messages, "
       "restarts, stats (its last message) and history"),
    _F("monitor", a_map, "the monitor's pid, start time, http URL and endpoint"),
), """
The monitor's board, the document `/stats` serves as JSON.""")


def monitor_request() -> list[bytes]:
    """The frames a DEALER sends to ask the monitor for its snapshot."""
    return [b"", MONITOR_REQUEST]


def is_monitor_request(frames: list[bytes]) -> bool:
    """True if ``frames`` (as a ROUTER receives them: envelope, request) ask for the snapshot."""
    return len(frames) >= 2 and frames[-1] == MONITOR_REQUEST


def encode_snapshot(snapshot: Mapping[str, Any]) -> bytes:
    """The monitor's reply frame for ``snapshot``."""
    return pack_map(SNAPSHOT, snapshot)


def decode_snapshot(frame: bytes) -> dict[str, Any]:
    """The snapshot in the monitor's reply frame; ValueError if it is not one."""
    body = unpack_map(SNAPSHOT, frame)
    check_map(SNAPSHOT, body)
    return body


if __name__ == "__main__":
    sys.stdout.write(fields_markdown(STAT))
