"""Setting up, starting and stopping a service run by supervisord.

    lmshard init DIR [--shards N] [--readers M] [--schema module:attr] [--python-path P]
    lmshard supervisord-conf [-c CONFIG]     (re)write supervisord.conf next to the config
    lmshard up [-c CONFIG] [--foreground]    start supervisord, wait until every shard answers
    lmshard down [-c CONFIG]                 stop supervisord and everything it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from lmshard.config import DEFAULT_MONITOR_HTTP, Config, ConfigError, load_config, make_config
from lmshard.ops import preflight
from lmshard.ops.command import EXIT_FAILED, EXIT_OK, config_option, say
from lmshard.ops.supervise import SupervisorError
from lmshard.ops.supervise.conf import (
    SupervisorFiles,
    refresh_supervisord_conf,
    render_supervisord_conf,
    service_files,
    supervisord_conf_path,
    write_supervisord_conf,
)
from lmshard.ops.supervise.control import (
    DOWN_TIMEOUT,
    ForegroundSupervisord,
    ensure_dirs,
    remove_stale_sockets,
    start_daemon,
    stop,
)
from lmshard.ops.supervise.rpc import UP_TIMEOUT, supervisord_pid, wait_until_up

# --------------------------------------------------------------------------------------------
# init, supervisord-conf
# --------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """``lmshard init DIR``: write DIR/lmshard.toml and DIR/supervisord.conf, make the dirs."""
    base = Path(args.dir).absolute()
    target = base / "lmshard.toml"
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists", hint="pass --force to overwrite it")
    log_dir = Path(args.log_dir).absolute() if args.log_dir else base / "var" / "log"
    config = dataclasses.replace(_init_config(base, args), path=target)
    # Everything is checked and rendered before the first file is written: a failed init
    # leaves nothing behind that would make the next one refuse.
    preflight.check_schema(config)
    paths = [config.data_dir, config.run_dir, *config.python_path]
    inside = all(p.is_relative_to(base) for p in paths)
    toml = config.to_toml(relative_to=base if inside else None)
    conf_text = render_supervisord_conf(config, log_dir=log_dir, alerts=not args.no_alerts)
    base.mkdir(parents=True, exist_ok=True)
    target.write_text(toml)
    conf = supervisord_conf_path(config)
    conf.write_text(conf_text)
    ensure_dirs(config, SupervisorFiles.read(conf))
    say(f"wrote {target}\nwrote {conf}\ndata {config.data_dir}\nrun  {config.run_dir} (0700)\n"
        f"logs {log_dir}\nstart it with: lmshard up -c {target}")
    return EXIT_OK


def _init_config(base: Path, args: argparse.Namespace) -> Config:
    """The config ``lmshard init`` writes into ``base``, from its arguments."""
    run_dir = Path(args.run_dir).absolute() if args.run_dir else base / "var" / "run"
    python_path = [str(Path(p).absolute()) for p in args.python_path]
    try:
        return make_config(
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


def cmd_supervisord_conf(args: argparse.Namespace) -> int:
    """``lmshard supervisord-conf``: (re)write supervisord.conf for a config."""
    config = load_config(args.config)
    log_dir = Path(args.log_dir).absolute() if args.log_dir else None
    out = Path(args.output).absolute() if args.output else None
    path = write_supervisord_conf(config, log_dir=log_dir, alerts=not args.no_alerts, out=out)
    say(f"wrote {path}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# up, down
# --------------------------------------------------------------------------------------------


def _progress(up: int, total: int) -> None:
    say(f"waiting for shards: {up}/{total} up")


def cmd_up(args: argparse.Namespace) -> int:
    """``lmshard up``: check, start supervisord and wait until every shard answers."""
    config = load_config(args.config)
    files = service_files(config)
    if supervisord_pid(files) is None:
        # Checked before supervisord starts: it would retry a failing process for many
        # seconds before giving up, and an outdated supervisord.conf would run old programs.
        preflight.check_all(config)
        note = refresh_supervisord_conf(config)
        if note:
            say(note)
    if args.foreground:
        return _up_foreground(config, files, args.timeout)
    pid = start_daemon(config, files)
    say(f"supervisord pid {pid} ({files.conf})")
    try:
        wait_until_up(config, files, timeout=args.timeout, progress=_progress)
    except SupervisorError as exc:
        stop(config, files)
        raise SupervisorError(f"{exc.message}\nstopped supervisord again; the logs stay in "
                              f"{files.log_dir}", hint=exc.hint) from None
    say(f"lmshard is up: {config.shards} shards; logs in {files.log_dir}")
    return EXIT_OK


def _up_foreground(config: Config, files: SupervisorFiles, timeout: float) -> int:
    status = EXIT_OK
    with ForegroundSupervisord(config, files) as supervisord:
        try:
            supervisord.wait_for_socket()
            wait_until_up(config, files, timeout=timeout, progress=_progress,
                          still_waiting=supervisord.running)
            say(f"lmshard is up: {config.shards} shards under supervisord pid "
                f"{supervisord.pid} in the foreground; Ctrl-C stops everything")
        except SupervisorError as exc:
            if not supervisord.stopped_by_signal:
                print(f"lmshard: {exc}", file=sys.stderr, flush=True)
                status = EXIT_FAILED
            supervisord.terminate()
        code = supervisord.wait()
    remove_stale_sockets(config, files)
    if status == EXIT_OK and code not in (0, -signal.SIGTERM, -signal.SIGINT):
        print(f"lmshard: supervisord exited {code}; see {files.logfile}", file=sys.stderr)
        status = EXIT_FAILED
    if status == EXIT_OK:
        say("lmshard stopped")
    return status


def cmd_down(args: argparse.Namespace) -> int:
    """``lmshard down``: stop supervisord and everything it runs."""
    config = load_config(args.config)
    files = service_files(config)
    running = supervisord_pid(files) is not None
    notes = stop(config, files, timeout=args.timeout)
    for note in notes:
        say(note)
    say("lmshard stopped" if running else "lmshard was not running")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# The parsers
# --------------------------------------------------------------------------------------------


def _alerts_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-alerts", action="store_true",
                   help="leave out the eventlistener that reports crashed shard owners")
    p.add_argument("--alerts", action="store_true", help=argparse.SUPPRESS)  # the default now


def add_parsers(subparsers: Any) -> None:
    """Register ``init``, ``supervisord-conf``, ``up`` and ``down`` on the ``lmshard`` CLI."""
    p = subparsers.add_parser("init", help="write DIR/lmshard.toml and DIR/supervisord.conf")
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

    p = subparsers.add_parser("supervisord-conf", parents=[config_option()],
                              help="(re)write supervisord.conf for a config")
    p.add_argument("--log-dir", help="log files (default: var/log beside the data_dir)")
    _alerts_flags(p)
    p.add_argument("-o", "--output", help="write here instead of next to the config")
    p.set_defaults(func=cmd_supervisord_conf)

    p = subparsers.add_parser("up", parents=[config_option()],
                              help="start supervisord and wait until every shard answers")
    p.add_argument("--foreground", action="store_true",
                   help="run supervisord in the foreground; Ctrl-C or TERM stops everything")
    p.add_argument("--timeout", type=float, default=UP_TIMEOUT,
                   help=f"seconds to wait for the shards (default {UP_TIMEOUT:g})")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", parents=[config_option()],
                              help="stop supervisord and its processes")
    p.add_argument("--timeout", type=float, default=DOWN_TIMEOUT,
                   help=f"seconds to wait for supervisord (default {DOWN_TIMEOUT:g})")
    p.set_defaults(func=cmd_down)
