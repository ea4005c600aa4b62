"""``lmshard status`` and ``lmshard ctl``: what a running service is doing, and supervisorctl
for anything else.

    lmshard status [-c CONFIG] [--json]      processes and shard health
    lmshard ctl [-c CONFIG] ARGS...          supervisorctl on this service's supervisord

``status`` lists every process supervisord runs with its state, pid and uptime, and pings each
shard owner (round trip, last commit, map and reader use); with replica.names, every copy of
every shard with its role, epoch, applied txn and lag. Exit status 0 when everything runs and
answers, 1 when something does not, 3 when supervisord is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from lmshard.client import Client
from lmshard.config import Config, ConfigError, load_config
from lmshard.errors import ShardUnavailable
from lmshard.ops.command import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, config_option, say
from lmshard.ops.replica_cli import copies_status, copy_line
from lmshard.ops.supervise.conf import GROUP, SupervisorFiles, service_files
from lmshard.ops.supervise.control import supervisorctl_command
from lmshard.ops.supervise.rpc import (
    PING_TIMEOUT_MS,
    copy_health,
    health_client,
    process_infos,
    shard_of_process,
    supervisord_pid,
)
from lmshard.stats_board import query_monitor
from lmshard.units import format_bytes


def collect_status(config: Config, files: SupervisorFiles) -> dict[str, Any]:
    """Every supervisord process with its state, and each shard owner's health."""
    pid = supervisord_pid(files)
    out: dict[str, Any] = {
        "config": str(config.path),
        "supervisord": {"running": pid is not None, "pid": pid, "conf": str(files.conf),
                        "socket": str(files.socket), "log": str(files.logfile)},
        "processes": [],
    }
    if pid is None:
        return out
    infos = process_infos(files)
    with health_client(config) as client:
        out["processes"] = [_process_status(config, client, info) for info in infos]
    if config.replica_names:
        out["copies"] = copies_status(config)
    return out


def _process_status(config: Config, client: Client, info: dict[str, Any]) -> dict[str, Any]:
    """One process of ``collect_status``: supervisord's view, and a shard owner's health."""
    running = info["statename"] == "RUNNING"
    entry: dict[str, Any] = {
        "name": info["fullname"],
        "state": info["statename"],
        "pid": info["pid"] or None,
        "uptime": info["now"] - info["start"] if running else None,
        "description": info["description"],
        "log": info["stdout_logfile"] or info["stderr_logfile"] or None,
    }
    if info["fullname"] == f"{GROUP}:monitor" and running:
        entry["metrics"] = _metrics_url(config)
    shard = shard_of_process(info)
    if shard is not None:
        entry["shard"] = shard
        entry["health"], entry["health_error"] = None, None
        if running:
            try:
                entry["health"] = _shard_health(config, client, shard)
            except ShardUnavailable as exc:
                entry["health_error"] = exc.message
    return entry


def _shard_health(config: Config, client: Client, shard: int) -> dict[str, Any]:
    """A shard owner's (on a replica host: its replica's) ping answer, with the commit age
    and map use worked out."""
    now = time.time()
    h = copy_health(config, client, shard)
    h["last_commit_age"] = now - h["last_commit"] if h["last_commit"] else None
    if "map_size" in h:  # a replica taking its first snapshot has no copy yet
        h["map_used_pct"] = 100 * h["map_used"] / h["map_size"]
        h["max_map_used_pct"] = 100 * h["map_used"] / h["max_map_size"]
    return h


def _metrics_url(config: Config) -> str | None:
    """The monitor's /metrics URL as the running monitor reports it (port 0 resolved)."""
    snap = query_monitor(config, timeout_ms=PING_TIMEOUT_MS)
    url = (snap or {}).get("monitor", {}).get("http")
    return f"{url}/metrics" if url else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def _health_text(p: dict[str, Any]) -> str:
    h = p.get("health")
    if h is None:
        return f"ping: {p['health_error']}" if p.get("health_error") else ""
    if h.get("role") == "replica":
        lag = (f"lag {h['lag_txns']} txns, {h['lag_seconds']:.1f}s" if h["lag_txns"]
               else "caught up")
        copy = (f"  map {h['map_used_pct']:.1f}% of {format_bytes(h['map_size'])}  readers "
                f"{h['readers']}/{h['max_readers']}" if "map_size" in h else "")
        return (f"ping {h['rtt_ms']:.1f}ms  replica {h['member']} of {h['primary']} epoch "
                f"{h['epoch']}  applied {h['applied']}  {lag}  ({h['state']}){copy}")
    age = h["last_commit_age"]
    commit = "no commit yet" if age is None else f"last commit {_duration(age)} ago"
    full = h.get("disk_full")
    refusing = (f"WRITES REFUSED: disk full for {_duration(time.time() - full['since'])} "
                f"({full['refused']} batches)  " if full else "")
    return (f"{refusing}ping {h['rtt_ms']:.1f}ms  txn {h['txn_id']}  {commit}  "
            f"map {h['map_used_pct']:.1f}% of {format_bytes(h['map_size'])}, "
            f"{h['max_map_used_pct']:.2f}% of max {format_bytes(h['max_map_size'])}  "
            f"readers {h['readers']}/{h['max_readers']}{_changes_text(h.get('changes'))}")


def _changes_text(c: dict[str, Any] | None) -> str:
    """The change log's part of a shard's status line (nothing when the log is off)."""
    if not c:
        return ""
    oldest = "" if c["oldest_txn"] is None else f" from txn {c['oldest_txn']}"
    watches = f"{c['watchers']} watch{'es' if c['watchers'] != 1 else ''}"
    lag = f", {c['max_lag_seconds']:.1f}s behind" if c["max_lag_txns"] else ""
    return f"  changes {format_bytes(c['bytes'])}{oldest}, {watches}{lag}"


def _process_line(p: dict[str, Any], width: int) -> str:
    pid = str(p["pid"] or "-")
    extra = (_health_text(p) if "shard" in p else "") or (
        "" if p["state"] == "RUNNING" else p["description"])
    if p.get("metrics"):
        extra = f"serving {p['metrics']}"
    return (f"{p['name']:<{width}}  {p['state']:<8}  pid {pid:<7}  "
            f"up {_duration(p['uptime']):<9}  {extra}").rstrip()


def _healthy(status: dict[str, Any]) -> bool:
    """Every process runs, every owner answers, and none refuses writes for a full disk."""
    return all(p["state"] == "RUNNING" and p.get("health_error") is None
               and not (p.get("health") or {}).get("disk_full")
               for p in status["processes"])


def cmd_status(args: argparse.Namespace) -> int:
    """``lmshard status``: one line per process with shard health, or JSON."""
    config = load_config(args.config)
    files = service_files(config)
    status = collect_status(config, files)
    sup = status["supervisord"]
    if args.json:
        say(json.dumps(status, indent=2, sort_keys=True))
    elif not sup["running"]:
        say(f"lmshard is not running (no supervisord on {files.socket}); start it with "
            f"`lmshard up -c {config.path}`")
    else:
        say(f"supervisord pid {sup['pid']}  {files.conf}")
        width = max((len(p["name"]) for p in status["processes"]), default=0)
        for p in status["processes"]:
            say(_process_line(p, width))
        if "copies" in status:
            say("copies:")
            for c in status["copies"]:
                say(f"  {copy_line(c)}")
    if not sup["running"]:
        return EXIT_NOT_RUNNING
    return EXIT_OK if _healthy(status) else EXIT_FAILED


def split_config_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """``-c FILE`` / ``--config FILE`` (or ``-cFILE``, ``--config=FILE``) wherever it is in
    ``argv``, and the other arguments: ``ctl pid lmshard:shard_01 -c FILE`` means the same as
    ``ctl -c FILE pid lmshard:shard_01`` (supervisorctl's own -c is never wanted: lmshard
    gives it the service's supervisord.conf)."""
    config = None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-c", "--config"):
            config = next(it, None)
            if config is None:
                raise ConfigError(f"{arg} needs a file name", hint="lmshard ctl -c FILE ARGS")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2:
            config = arg[2:]
        else:
            rest.append(arg)
    return config, rest


def cmd_ctl(args: argparse.Namespace) -> int:
    """``lmshard ctl ARGS``: supervisorctl on this service's supervisord, in our place."""
    late, rest = split_config_option(args.args)
    if late is not None and args.config is not None and late != args.config:
        raise ConfigError(f"two config files given: {args.config} and {late}",
                          hint="pass -c once")
    config = load_config(late or args.config)
    argv = supervisorctl_command(service_files(config), rest)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # supervisorctl owns the terminal from here (tail -f, Ctrl-C)
    return EXIT_OK  # pragma: no cover


def add_parsers(subparsers: Any) -> None:
    """Register ``status [-c CONFIG] [--json]`` and ``ctl [-c CONFIG] ARGS...`` on the
    ``lmshard`` CLI."""
    p = subparsers.add_parser("status", parents=[config_option()],
                              help="process states and shard health")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("ctl", parents=[config_option()],
                              help=f"run supervisorctl, e.g. `ctl restart {GROUP}:shard_01`")
    p.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments")
    p.set_defaults(func=cmd_ctl)
