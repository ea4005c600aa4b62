"""``lmshard``: set up, start, stop and inspect an lmshard service run by supervisord.

    lmshard init DIR [--shards N] [--readers M] [--schema module:attr] [--python-path P]
    lmshard supervisord-conf [-c CONFIG]     (re)write supervisord.conf next to the config
    lmshard up [-c CONFIG] [--foreground]    start supervisord, wait until every shard answers
    lmshard down [-c CONFIG]                 stop supervisord and everything it runs
    lmshard status [-c CONFIG] [--json]      processes and shard health
    lmshard ctl [-c CONFIG] ARGS...          supervisorctl on this service's supervisord
    lmshard demo [-c CONFIG] [--workers N] [--seconds S]

Every command finds the config by ``-c``, then ``$LMSHARD_CONFIG``, then
``./config/lmshard.toml``; supervisord.conf is the file next to it. Exit status: 0 ok,
1 failed, 2 bad usage or config, 3 (status) not running.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmshard import preflight, supervise
from lmshard.config import (
    DEFAULT_MONITOR_HTTP,
    ENV_VAR,
    Config,
    ConfigError,
    load_config,
    make_config,
)
from lmshard.errors import Error, ShardUnavailable
from lmshard.supervise import GROUP, SupervisorError, SupervisorFiles

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def _say(text: str) -> None:
    print(text, flush=True)


def _files(config: Config) -> SupervisorFiles:
    return SupervisorFiles.read(supervise.supervisord_conf_path(config))


# --------------------------------------------------------------------------------------------
# init, supervisord-conf
# --------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    base = Path(args.dir).absolute()
    target = base / "lmshard.toml"
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists", hint="pass --force to overwrite it")
    run_dir = Path(args.run_dir).absolute() if args.run_dir else base / "var" / "run"
    log_dir = Path(args.log_dir).absolute() if args.log_dir else base / "var" / "log"
    python_path = [str(Path(p).absolute()) for p in args.python_path]
    try:
        config = make_config(
            base_dir=base, shards=args.shards, readers=args.readers, schema=args.schema,
            python_path=python_path, data_dir=str(base / "var" / "data"), run_dir=str(run_dir),
            monitor_http=args.monitor_http,
        )
    except ConfigError as exc:
        if exc.key and "endpoint" in exc.key:
            raise ConfigError(
                exc.detail, key=exc.key,
                hint="pass a shorter run directory: lmshard init DIR --run-dir /tmp/lmshard-NAME "
                "(or /run/lmshard)") from exc
        raise
    # Everything is checked and rendered before the first file is written: a failed init
    # leaves nothing behind that would make the next one refuse.
    config = dataclasses.replace(config, path=target)
    preflight.check_schema(config)
    paths = [config.data_dir, config.run_dir, *config.python_path]
    inside = all(p.is_relative_to(base) for p in paths)
    toml = config.to_toml(relative_to=base if inside else None)
    conf_text = supervise.render_supervisord_conf(config, log_dir=log_dir,
                                                  alerts=not args.no_alerts)
    base.mkdir(parents=True, exist_ok=True)
    target.write_text(toml)
    conf = supervise.supervisord_conf_path(config)
    conf.write_text(conf_text)
    supervise.ensure_dirs(config, SupervisorFiles.read(conf))
    _say(f"wrote {target}\nwrote {conf}\ndata {config.data_dir}\nrun  {config.run_dir} (0700)\n"
         f"logs {log_dir}\nstart it with: lmshard up -c {target}")
    return 0


def cmd_supervisord_conf(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    log_dir = Path(args.log_dir).absolute() if args.log_dir else None
    out = Path(args.output).absolute() if args.output else None
    path = supervise.write_supervisord_conf(config, log_dir=log_dir, alerts=not args.no_alerts,
                                            out=out)
    _say(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------
# up, down
# --------------------------------------------------------------------------------------------


def _progress(up: int, total: int) -> None:
    _say(f"waiting for shards: {up}/{total} up")


def cmd_up(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    files = _files(config)
    if supervise.supervisord_pid(files) is None:
        # Checked before supervisord starts: it would retry a failing process for many
        # seconds before giving up, and an outdated supervisord.conf would run old programs.
        preflight.check_all(config)
        note = supervise.refresh_supervisord_conf(config)
        if note:
            _say(note)
    if args.foreground:
        return _up_foreground(config, files, args.timeout)
    pid = supervise.start_daemon(config, files)
    _say(f"supervisord pid {pid} ({files.conf})")
    try:
        supervise.wait_until_up(config, files, timeout=args.timeout, progress=_progress)
    except SupervisorError as exc:
        supervise.stop(config, files)
        raise SupervisorError(f"{exc.message}\nstopped supervisord again; the logs stay in "
                              f"{files.log_dir}", hint=exc.hint) from None
    _say(f"lmshard is up: {config.shards} shards; logs in {files.log_dir}")
    return 0


def _up_foreground(config: Config, files: SupervisorFiles, timeout: float) -> int:
    supervise.refuse_if_running(config, files)
    supervise.ensure_dirs(config, files)
    proc = subprocess.Popen(supervise.supervisord_command(files, foreground=True),
                            stdin=subprocess.DEVNULL)
    stopping: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        # Ctrl-C reaches supervisord too (same process group); TERM from a service manager
        # reaches only us. supervisord shuts down on either, so always pass TERM on.
        stopping.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    try:
        try:
            deadline = time.monotonic() + 10
            while supervise.supervisord_pid(files) is None:
                if proc.poll() is not None or stopping or time.monotonic() > deadline:
                    raise SupervisorError(f"supervisord did not start; see {files.logfile}")
                time.sleep(0.05)
            supervise.wait_until_up(
                config, files, timeout=timeout, progress=_progress,
                still_waiting=lambda: not stopping and proc.poll() is None)
            _say(f"lmshard is up: {config.shards} shards under supervisord pid {proc.pid} in "
                 f"the foreground; Ctrl-C stops everything")
        except SupervisorError as exc:
            if not stopping:
                print(f"lmshard: {exc}", file=sys.stderr, flush=True)
                status = EXIT_FAILED
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # we are dying of something unexpected: take it along
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    supervise.remove_stale_sockets(config, files)
    if status == 0 and code not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"lmshard: supervisord exited {code}; see {files.logfile}", file=sys.stderr)
        status = EXIT_FAILED
    if status == 0:
        _say("lmshard stopped")
    return status


def cmd_down(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    files = _files(config)
    running = supervise.supervisord_pid(files) is not None
    notes = supervise.stop(config, files, timeout=args.timeout)
    for note in notes:
        _say(note)
    _say("lmshard stopped" if running else "lmshard was not running")
    return 0


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def collect_status(config: Config, files: SupervisorFiles) -> dict[str, Any]:
    """Every supervisord process with its state, and each shard owner's health."""
    pid = supervise.supervisord_pid(files)
    out: dict[str, Any] = {
        "config": str(config.path),
        "supervisord": {"running": pid is not None, "pid": pid, "conf": str(files.conf),
                        "socket": str(files.socket), "log": str(files.logfile)},
        "processes": [],
    }
    if pid is None:
        return out
    infos = supervise.process_infos(files)
    now = time.time()
    with supervise.health_client(config) as client:
        for info in infos:
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
            shard = supervise.shard_of_process(info)
            if shard is not None:
                entry["shard"] = shard
                entry["health"], entry["health_error"] = None, None
                if running:
                    try:
                        h = client.ping(shard)
                    except ShardUnavailable as exc:
                        entry["health_error"] = exc.message
                    else:
                        h["last_commit_age"] = now - h["last_commit"] if h["last_commit"] else None
                        h["map_used_pct"] = 100 * h["map_used"] / h["map_size"]
                        h["max_map_used_pct"] = 100 * h["map_used"] / h["max_map_size"]
                        entry["health"] = h
            out["processes"].append(entry)
    return out


def _metrics_url(config: Config) -> str | None:
    """The monitor's /metrics URL as the running monitor reports it (port 0 resolved)."""
    from lmshard.monitoring import query_monitor

    snap = query_monitor(config, timeout_ms=supervise.PING_TIMEOUT_MS)
    url = (snap or {}).get("monitor", {}).get("http")
    return f"{url}/metrics" if url else None


def _health_text(p: dict[str, Any]) -> str:
    h = p.get("health")
    if h is None:
        return f"ping: {p['health_error']}" if p.get("health_error") else ""
    age = h["last_commit_age"]
    commit = "no commit yet" if age is None else f"last commit {_duration(age)} ago"
    return (f"ping {h['rtt_ms']:.1f}ms  txn {h['txn_id']}  {commit}  "
            f"map {h['map_used_pct']:.1f}% of {_size(h['map_size'])}, "
            f"{h['max_map_used_pct']:.2f}% of max {_size(h['max_map_size'])}  "
            f"readers {h['readers']}/{h['max_readers']}")


def _healthy(status: dict[str, Any]) -> bool:
    return all(p["state"] == "RUNNING" and p.get("health_error") is None
               for p in status["processes"])


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    files = _files(config)
    status = collect_status(config, files)
    sup = status["supervisord"]
    if args.json:
        _say(json.dumps(status, indent=2, sort_keys=True))
    elif not sup["running"]:
        _say(f"lmshard is not running (no supervisord on {files.socket}); start it with "
             f"`lmshard up -c {config.path}`")
    else:
        _say(f"supervisord pid {sup['pid']}  {files.conf}")
        width = max(len(p["name"]) for p in status["processes"]) if status["processes"] else 0
        for p in status["processes"]:
            pid = str(p["pid"] or "-")
            extra = (_health_text(p) if "shard" in p else "") or (
                "" if p["state"] == "RUNNING" else p["description"])
            if p.get("metrics"):
                extra = f"serving {p['metrics']}"
            _say(f"{p['name']:<{width}}  {p['state']:<8}  pid {pid:<7}  "
                 f"up {_duration(p['uptime']):<9}  {extra}".rstrip())
    if not sup["running"]:
        return EXIT_NOT_RUNNING
    return 0 if _healthy(status) else EXIT_FAILED


# --------------------------------------------------------------------------------------------
# ctl, demo
# --------------------------------------------------------------------------------------------


def cmd_ctl(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    files = _files(config)
    argv = supervise.supervisorctl_command(files, args.args)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # supervisorctl owns the terminal from here (tail -f, Ctrl-C)
    return 0  # pragma: no cover


def cmd_demo(args: argparse.Namespace) -> int:
    from lmshard import demo

    config = load_config(args.config)
    if config.load_schema() is not demo.schema:
        raise ConfigError(f"the service serves schema {config.schema!r}; the demo writes the "
                          "tables of lmshard.demo:schema", key="schema", file=config.path,
                          hint="run the demo against a service with schema = "
                          '"lmshard.demo:schema", e.g. `make run`')
    _say(f"demo: {args.workers} workers for {args.seconds:g} s against {config.path} "
         f"({config.shards} shards)")
    summary = demo.run(str(config.path), workers=args.workers, seconds=args.seconds)
    _say(demo.report(summary))
    return EXIT_FAILED if summary["failures"] else 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _alerts_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-alerts", action="store_true",
                   help="leave out the eventlistener that reports crashed shard owners")
    p.add_argument("--alerts", action="store_true", help=argparse.SUPPRESS)  # the default now


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lmshard", description="Set up, run and inspect an lmshard service (supervisord).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument(
        "-c", "--config", help=f"lmshard config file (default: ${ENV_VAR}, then "
        "./config/lmshard.toml); supervisord.conf is the file next to it")

    p = sub.add_parser("init", help="write DIR/lmshard.toml and DIR/supervisord.conf")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    p.add_argument("--readers", type=int, default=2, help="reader pool processes (default 2)")
    p.add_argument("--schema", default="lmshard.demo:schema",
                   help='schema object as "module:attr" (default lmshard.demo:schema)')
    p.add_argument("--python-path", action="append", default=[], metavar="P",
                   help="directory every lmshard process prepends to sys.path (repeatable)")
    p.add_argument("--run-dir", help="sockets and pid files (default DIR/var/run; keep it "
                   "short: unix socket paths hold at most 107 bytes)")
    p.add_argument("--log-dir", help="log files (default DIR/var/log)")
    p.add_argument("--monitor-http", default=DEFAULT_MONITOR_HTTP, metavar="HOST:PORT",
                   help="where the monitor serves /metrics, or off (default "
                   f"{DEFAULT_MONITOR_HTTP}; give each service on a host its own port)")
    _alerts_flags(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing lmshard.toml")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("supervisord-conf", parents=[with_config],
                       help="(re)write supervisord.conf for a config")
    p.add_argument("--log-dir", help="log files (default: var/log beside the data_dir)")
    _alerts_flags(p)
    p.add_argument("-o", "--output", help="write here instead of next to the config")
    p.set_defaults(func=cmd_supervisord_conf)

    p = sub.add_parser("up", parents=[with_config],
                       help="start supervisord and wait until every shard answers")
    p.add_argument("--foreground", action="store_true",
                   help="run supervisord in the foreground; Ctrl-C or TERM stops everything")
    p.add_argument("--timeout", type=float, default=supervise.UP_TIMEOUT,
                   help=f"seconds to wait for the shards (default {supervise.UP_TIMEOUT:g})")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", parents=[with_config], help="stop supervisord and its processes")
    p.add_argument("--timeout", type=float, default=supervise.DOWN_TIMEOUT,
                   help=f"seconds to wait for supervisord (default {supervise.DOWN_TIMEOUT:g})")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", parents=[with_config],
                       help="process states and shard health")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ctl", parents=[with_config],
                       help=f"run supervisorctl, e.g. `ctl restart {GROUP}:shard_01`")
    p.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments")
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser("demo", parents=[with_config],
                       help="run a demo workload against the running service")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    p.set_defaults(func=cmd_demo)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        mod.add_parsers(sub)
    return ap


COMMAND_MODULES = (
    "lmshard.monitoring", "lmshard.cli_backup", "lmshard.cli_keys", "lmshard.cli_bench",
)
"""Modules adding their own subcommands via ``add_parsers(subparsers)``; each sets ``func``."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Error, SupervisorError) as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("lmshard: interrupted (`lmshard status` shows what runs)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmshard status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
