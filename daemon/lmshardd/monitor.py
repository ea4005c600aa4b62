"""``lmshardd monitor``: follow every shard's stats; serve Prometheus ``/metrics`` and ``/stats``.

The monitor subscribes to every owner's ``stat.<shard>`` messages (``lmshard.stats_board``),
keeps the latest one and a short history per shard, and serves them:

- over HTTP (``monitor.http`` in the config, default 127.0.0.1:9464; ``--http`` overrides it):
  ``/metrics`` in the Prometheus text format (or OpenMetrics, if the scraper asks), rendered
  by prometheus_client from a custom collector; ``/stats`` as JSON (the same document
  ``lmshard stats --json`` prints);
- on ``monitor.endpoint`` (ZeroMQ ROUTER, secured like every lmshard socket): the snapshot as
  msgpack, for ``lmshard stats``, which finds the monitor through the config this way (the
  ``monitor`` channel of ``lmshard.stats_wire``).

A shard whose messages stop is stale: ``lmshard_shard_up`` 0 and ``lmshard_stats_age_seconds``
growing; its other series are left out (a gap, not zeros) until it reports again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import zmq
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from lmshard import security, stats_board, stats_wire
from lmshard.config import Config, format_http, is_loopback, parse_http
from lmshard.errors import Error
from lmshardd.hangup import report_hangup

log = logging.getLogger("lmshardd.monitor")

POLL_MS = 100
"""How long the loop waits for messages before it looks at signals."""
QUANTILE_LABELS = (("p50", "0.5"), ("p99", "0.99"))
"""Message quantile fields and their Prometheus ``quantile`` label."""


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


class SnapshotCollector:
    """A prometheus_client collector over a function returning a board snapshot."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from metric_families(snap)


def metric_families(snap: dict[str, Any]) -> list[Metric]:
    """The Prometheus metric families of a snapshot (the list in docs/monitoring.md)."""
    shard_l = ["shard"]

    def gauge(name: str, doc: str, unit: str = "") -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=shard_l, unit=unit)

    def counter(name: str, doc: str) -> Metric:
        return Metric(name, doc, "counter")

    up = gauge("lmshard_shard_up", "1 if the shard's stats arrived within stale_after seconds")
    age = gauge("lmshard_stats_age_seconds",
                "seconds since the shard's last stats message (since monitor start if none)")
    shards = GaugeMetricFamily("lmshard_shards", "shards in the config")
    shards.add_metric([], snap["shards_total"])
    bad = counter("lmshard_monitor_bad_messages", "stats messages the monitor refused")
    bad.add_sample("lmshard_monitor_bad_messages_total", {}, snap.get("bad_messages", 0))
    received = counter("lmshard_stats_messages", "stats messages received from the shard")
    counters = {
        "ops": counter("lmshard_writes", "write ops committed"),
        "batches": counter("lmshard_batches", "write batches committed and acked"),
        "failed_batches": counter("lmshard_failed_batches",
                                  "write batches answered with an error (nothing applied)"),
        "duplicate_batches": counter("lmshard_duplicate_batches",
                                     "retried batches answered again without applying them"),
        "reads": counter("lmshard_reads", "read, ping and stats requests the owner served"),
        "bad_frames": counter("lmshard_bad_frames", "request frames the owner refused"),
        "dropped": counter("lmshard_stats_dropped", "stats messages the owner dropped"),
    }
    latency = Metric("lmshard_commit_latency_seconds",
                     "group commit duration; quantiles over the last stats window", "summary")
    group = Metric("lmshard_group_batches",
                   "batches per group commit; quantiles over the last stats window", "summary")
    per_batch = Metric("lmshard_batch_ops",
                       "ops per acked batch; quantiles over the last stats window", "summary")
    latency_max = gauge("lmshard_commit_latency_max_seconds",
                        "longest group commit in the last stats window")
    depth = gauge("lmshard_queue_depth",
                  "batches drained into the last group commit of the window (0 if none)")
    depth_max = gauge("lmshard_queue_depth_max",
                      "most batches drained into one group commit in the window")
    gauges = {
        "map_size": gauge("lmshard_map_size_bytes", "LMDB map size now"),
        "map_used": gauge("lmshard_map_used_bytes", "bytes of the map in use (pages)"),
        "max_map_size": gauge("lmshard_map_max_bytes", "map size the owner may grow to"),
        "readers_used": gauge("lmshard_reader_slots_used", "LMDB reader slots held"),
        "readers_active": gauge("lmshard_read_transactions",
                                "reader slots in an open read transaction"),
        "max_readers": gauge("lmshard_reader_slots_max", "LMDB reader slot limit"),
        "last_txn_id": gauge("lmshard_last_txn_id", "last committed LMDB transaction id"),
        "started": gauge("lmshard_start_time_seconds", "unix time the owner started"),
        "uptime": gauge("lmshard_uptime_seconds", "seconds since the owner started"),
    }
    rows = GaugeMetricFamily("lmshard_table_rows", "rows in a table on the shard",
                             labels=["shard", "table"])
    changes = ChangeLogFamilies()
    replicas = ReplicaFamilies()

    for entry in snap["shards"]:
        sl = [str(entry["shard"])]
        labels = {"shard": sl[0]}
        up.add_metric(sl, 1 if entry["up"] else 0)
        age.add_metric(sl, entry["age"])
        received.add_sample("lmshard_stats_messages_total", labels, entry["messages"])
        s = entry.get("stats")
        if not entry["up"] or not s:
            continue  # stale: no numbers rather than old or zero ones
        for key, family in counters.items():
            family.add_sample(family.name + "_total", labels, s.get(key, 0))
        lat = s["commit_seconds"]
        for field, q in QUANTILE_LABELS:
            latency.add_sample(latency.name, labels | {"quantile": q}, _nan(lat.get(field)))
            group.add_sample(group.name, labels | {"quantile": q},
                             _nan(s["group_size"].get(field)))
            per_batch.add_sample(per_batch.name, labels | {"quantile": q},
                                 _nan(s["ops_per_batch"].get(field)))
        latency.add_sample(latency.name + "_count", labels, s.get("commits", 0))
        latency.add_sample(latency.name + "_sum", labels, lat.get("sum", 0.0))
        group.add_sample(group.name + "_count", labels, s.get("commits", 0))
        group.add_sample(group.name + "_sum", labels,
                         s.get("batches", 0) + s.get("failed_batches", 0)
                         + s.get("duplicate_batches", 0))
        per_batch.add_sample(per_batch.name + "_count", labels, s.get("batches", 0))
        per_batch.add_sample(per_batch.name + "_sum", labels, s.get("ops", 0))
        latency_max.add_metric(sl, _nan(lat.get("max")))
        depth.add_metric(sl, s.get("queue_depth", 0))
        depth_max.add_metric(sl, s.get("queue_depth_max", 0))
        for key, family in gauges.items():
            if s.get(key) is not None:
                family.add_metric(sl, s[key])
        for table, n in sorted(s["tables"].items()):
            rows.add_metric([sl[0], table], n)
        changes.add(sl[0], s.get("changes"))
        replicas.add(sl[0], s.get("epoch"), s.get("replication"))
    return [shards, up, age, received, bad, *counters.values(), latency, latency_max, group,
            per_batch, depth, depth_max, *gauges.values(), rows, *changes.families(),
            *replicas.families()]


class ChangeLogFamilies:
    """The ``lmshard_changes_*`` series: each shard's change log and how far its watches are
    behind (``stats_wire.changes_summary`` of its message's ``changes``)."""

    def __init__(self) -> None:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["shard"])

        self.gauges = {
            "bytes": gauge("lmshard_changes_bytes", "bytes of the map the change log takes"),
            "records": gauge("lmshard_changes_records",
                             "transactions the change log holds (one record each)"),
            "oldest_txn": gauge("lmshard_changes_oldest_txn",
                                "transaction id of the change log's oldest record (a watch "
                                "from before it gets ChangesCompacted)"),
            "watchers": gauge("lmshard_changes_watchers", "watches the owner serves"),
            "max_lag_txns": gauge("lmshard_changes_max_lag_txns",
                                  "transactions the furthest-behind watch has not been sent"),
            "max_lag_seconds": gauge("lmshard_changes_max_lag_seconds",
                                     "age of the oldest change the furthest-behind watch has "
                                     "not been sent (0 when every watch is caught up)"),
        }
        self.sent = Metric("lmshard_changes_sent", "changes the owner sent to watches",
                           "counter")

    def add(self, shard: str, log: dict[str, Any] | None) -> None:
        """One shard's numbers; nothing when its change log is off."""
        numbers = stats_wire.changes_summary(log)
        if numbers is None:
            return
        for key, family in self.gauges.items():
            if numbers[key] is not None:  # oldest_txn of an empty log
                family.add_metric([shard], numbers[key])
        self.sent.add_sample(self.sent.name + "_total", {"shard": shard},
                             numbers["sent_changes"])

    def families(self) -> list[Metric]:
        return [*self.gauges.values(), self.sent]


class ReplicaFamilies:
    """The shard's epoch and the ``lmshard_replica_*`` series: how far each replica has applied
    the shard's log, and the write acks waiting for replicas (``durability.replicas``)."""

    def __init__(self) -> None:
        replica_l = ["shard", "replica"]
        self.epoch = GaugeMetricFamily(
            "lmshard_shard_epoch", "the shard's epoch as its owner knows it (1, then +1 at every "
            "failover)", labels=["shard"])
        self.applied = GaugeMetricFamily(
            "lmshard_replica_applied_txn", "the owner's last transaction id the replica has "
            "applied durably", labels=replica_l)
        self.lag_txns = GaugeMetricFamily(
            "lmshard_replica_lag_txns", "transactions committed on the owner that the replica "
            "has not applied", labels=replica_l)
        self.lag_seconds = GaugeMetricFamily(
            "lmshard_replica_lag_seconds", "age of the oldest commit the replica has not "
            "applied (0 when caught up)", labels=replica_l)
        self.held = GaugeMetricFamily(
            "lmshard_replica_acks_held", "write acks waiting for durability.replicas replicas",
            labels=["shard"])
        self.timeouts = Metric("lmshard_replica_timeouts", "write acks answered ReplicaTimeout "
                               "(too few replicas confirmed in durability.replica_timeout)",
                               "counter")

    def add(self, shard: str, epoch: int | None, replication: dict[str, Any] | None) -> None:
        """One shard's numbers; no replica series without replica.names."""
        if epoch is not None:
            self.epoch.add_metric([shard], epoch)
        if not replication:
            return
        self.held.add_metric([shard], replication.get("held", 0))
        self.timeouts.add_sample(self.timeouts.name + "_total", {"shard": shard},
                                 replication.get("timeouts", 0))
        for name, r in sorted((replication.get("replicas") or {}).items()):
            self.applied.add_metric([shard, name], r.get("applied", 0))
            self.lag_txns.add_metric([shard, name], r.get("lag_txns", 0))
            self.lag_seconds.add_metric([shard, name], r.get("lag_seconds", 0.0))

    def families(self) -> list[Metric]:
        return [self.epoch, self.applied, self.lag_txns, self.lag_seconds, self.held,
                self.timeouts]


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------


class Monitor:
    """A board fed by a subscriber, served over HTTP and on ``monitor.endpoint``."""

    def __init__(self, config: Config, *, stale_after: float | None = None) -> None:
        self.config = config
        self.board = stats_board.StatsBoard(config, stale_after=stale_after)
        self.lock = threading.Lock()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.subscriber = stats_board.StatsSubscriber(config, self.ctx)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshot))
        self.query: zmq.Socket[bytes] | None = None
        self.http: ThreadingHTTPServer | None = None
        self.http_url: str | None = None
        self.started = time.time()
        self.stopping = False
        self.hangup = False

    def snapshot(self, history: bool = True) -> dict[str, Any]:
        with self.lock:
            snap = self.board.snapshot(history=history)
        snap["monitor"] = {"pid": os.getpid(), "started": self.started, "http": self.http_url,
                           "endpoint": self.config.monitor_endpoint}
        return snap

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # -- serving -----------------------------------------------------------------------------

    def start_http(self, host: str, port: int) -> None:
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "lmshard-monitor"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = urlsplit(self.path).path
                if path == "/metrics":
                    body, ctype = monitor.metrics(self.headers.get("Accept"))
                elif path == "/stats":
                    body = json.dumps(monitor.snapshot(), sort_keys=True).encode()
                    ctype = "application/json"
                elif path == "/":
                    body = (b"lmshard monitor: /metrics (Prometheus), /stats (JSON)\n")
                    ctype = "text/plain; charset=utf-8"
                else:
                    self.send_error(404, "try /metrics or /stats")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s: " + format, self.address_string(), *args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        server = Server((host, port), Handler)
        bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.http_url = f"http://{shown}:{bound_port}"
        self.http = server
        threading.Thread(target=server.serve_forever, name="monitor-http", daemon=True).start()
        if not is_loopback(host):
            log.warning("serving /metrics and /stats on %s, a non-loopback address, without "
                        "authentication", self.http_url)
        log.info("serving %s/metrics and %s/stats", self.http_url, self.http_url)

    def bind_query(self) -> None:
        endpoint = self.config.monitor_endpoint
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, stats_wire.MAX_REQUEST_BYTES)
        if endpoint.startswith("ipc://"):
            os.makedirs(os.path.dirname(endpoint[6:]), mode=0o700, exist_ok=True)
        try:
            security.secure_server(sock, self.config, endpoint)
            sock.bind(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        self.query = sock
        self.subscriber.poller.register(sock, zmq.POLLIN)
        log.info("answering snapshot requests on %s", endpoint)

    def _answer_queries(self) -> None:
        assert self.query is not None
        while True:
            try:
                frames = self.query.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not stats_wire.is_monitor_request(frames):
                with self.lock:
                    self.board.bad_messages += 1
                continue  # not our peer: no answer
            body = stats_wire.encode_snapshot(self.snapshot())
            with contextlib.suppress(zmq.Again):
                self.query.send_multipart([*frames[:-1], body], zmq.NOBLOCK)

    def serve_forever(self) -> None:
        sub = self.subscriber
        while not self.stopping:
            if self.hangup:  # SIGHUP: re-read the config and report it, between requests
                self.hangup = False
                report_hangup(self.config, "monitor", log)
            ready = dict(sub.poller.poll(POLL_MS))
            if self.query is not None and self.query in ready:
                self._answer_queries()
            for sock in ready:
                if sock in sub.socks:
                    with self.lock:
                        sub.take(sock, self.board)

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        if self.query is not None:
            self.query.close(linger=0)
            self.query = None
            endpoint = self.config.monitor_endpoint
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint[6:])
        self.subscriber.close()
        self.ctx.term()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http", metavar="HOST:PORT",
        help="serve /metrics and /stats here, or \"off\" (default: monitor.http in the config; "
        "port 0 picks a free "
        "one, shown in the log and in /stats)")
    parser.add_argument(
        "--stale-after", type=float, metavar="S",
        help=f"seconds without a message before a shard counts as down (default "
        f"{stats_board.STALE_INTERVALS:g} x monitor.stats_interval)")


def run(config: Config, args: argparse.Namespace) -> int:
    """Entry point of ``lmshardd monitor``: serve until SIGTERM/SIGINT; the exit status."""
    address = config.monitor_http
    if args.http is not None:
        try:
            address = None if args.http == "off" else parse_http(args.http)
        except ValueError as exc:
            log.error("--http: %s", exc)
            return 2
    if args.stale_after is not None and not args.stale_after > 0:
        log.error("--stale-after %r: expected seconds > 0", args.stale_after)
        return 2
    try:
        monitor = Monitor(config, stale_after=args.stale_after)
    except (zmq.ZMQError, Error) as exc:
        log.error("monitor cannot start: %s", exc)
        return 2
    try:
        try:
            monitor.bind_query()
        except (OSError, zmq.ZMQError, Error) as exc:
            log.error("monitor cannot start: %s", exc)
            return 2
        if address is None:
            log.info("monitor.http is off: no /metrics")
        else:
            try:
                monitor.start_http(*address)
            except OSError as exc:
                log.error("monitor cannot serve http on %s (monitor.http in %s): %s",
                          format_http(address), config.path, exc.strerror or exc)
                return 2

        def stop(signum: int, frame: Any) -> None:
            monitor.stopping = True

        def hangup(signum: int, frame: Any) -> None:
            monitor.hangup = True  # serve_forever re-reads the config between requests

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hangup)
        log.info("following %d shards' stats (stale after %g s)", config.shards,
                 monitor.board.stale_after)
        monitor.serve_forever()
        return 0
    finally:
        monitor.close()
