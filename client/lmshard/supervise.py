"""Running lmshard under supervisord: the generated config, and starting, watching, stopping it.

One supervisord per lmshard config. Its config (``supervisord.conf``, next to ``lmshard.toml``)
is rendered from ``deploy/supervisord.conf.template``: a group ``lmshard`` with one program per
role (``shard`` with one process per shard, later the reader pool and the monitor), a unix socket
for supervisorctl in the run directory, logs in the log directory. Everything here talks to
supervisord through its XML-RPC interface on that socket; ``lmshard.cli`` prints the results.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmshard.client import Client
from lmshard.config import IPC_PATH_MAX, SUPERVISOR_SOCKET, Config, ConfigError
from lmshard.errors import ShardUnavailable
from lmshard.schema import Schema

GROUP = "lmshard"
"""The supervisord group of every lmshard program."""
ALERTS = "lmshard_alerts"
"""The alerts eventlistener's pool (supervisord keeps eventlisteners out of groups)."""
SUPERVISORD_CONF = "supervisord.conf"
"""File name of the generated supervisord config, in the directory of the lmshard config."""
PIDFILE_NAME = "supervisord.pid"
"""supervisord's pid file, in the run directory."""
DEPLOY = resources.files("lmshard") / "deploy"
"""Package data: the supervisord template, the alerts eventlistener and a systemd unit (the
checkout's ``deploy/`` is a link to this folder, the copy operators browse)."""
TEMPLATE = Path(str(DEPLOY / "supervisord.conf.template"))
EVENTLISTENER = Path(str(DEPLOY / "eventlistener.py"))

PROGRAMS = ("shard", "readers", "monitor")
"""The programs of group ``lmshard``, in start order: ``lmshardd owner`` once per shard, the
reader pool (``lmshardd readers``, ``readers.count`` processes; none if 0), the monitor. The
alerts eventlistener is a pool of its own (supervisord keeps eventlisteners out of groups)."""

UP_TIMEOUT = 60.0
"""Seconds ``lmshard up`` waits for every owner to answer a ping."""
DOWN_TIMEOUT = 90.0
"""Seconds ``lmshard down`` waits for supervisord to exit (it waits stopwaitsecs per process)."""
PING_TIMEOUT_MS = 250
"""How long one health ping waits for an owner."""
LOG_TAIL_LINES = 20
"""Lines of a process log shown when it does not come up."""

_OFF_REASONS = {
    "readers": "readers.count is 0 in the config",
    "alerts": "switched off with --no-alerts; `lmshard supervisord-conf` switches it on",
}
_BLOCK_RE = re.compile(r"^;@begin (\w+)\n(.*?)^;@end \1\n", re.M | re.S)
_BAD_PATH_CHARS = set('\n\r";#')


class SupervisorError(RuntimeError):
    """supervisord could not be started, reached or stopped, or a process did not come up.

    Not an ``lmshard.errors.Error``: those are the wire protocol's error table, and this one
    never crosses the wire. Same shape: ``message``, ``hint``.
    """

    hint = "see the log files named in the message; `lmshard status` shows what runs"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        super().__init__(f"{message} ({self.hint})" if self.hint else message)


# --------------------------------------------------------------------------------------------
# The generated config
# --------------------------------------------------------------------------------------------


def supervisord_conf_path(config: Config) -> Path:
    """Where the supervisord config of ``config`` lives: next to its lmshard.toml."""
    if config.path is None:
        raise SupervisorError("this config was not loaded from a file",
                              hint="write it with Config.to_toml() and load_config() it")
    return config.path.parent / SUPERVISORD_CONF


def default_log_dir(config: Config) -> Path:
    """``var/log`` beside ``var/data``: the parent of data_dir, plus ``log``."""
    return config.data_dir.parent / "log"


def _conf_value(path: Path | str, what: str) -> str:
    """A path as a supervisord config value: refused if the config syntax cannot carry it."""
    text = os.fspath(path)
    bad = sorted(set(text) & _BAD_PATH_CHARS)
    if bad:
        raise SupervisorError(
            f"{what} {text!r} contains {', '.join(map(repr, bad))}, which a supervisord config "
            "cannot hold", hint="use a path without quotes, ';', '#' or line breaks")
    return text.replace("%", "%%")  # supervisord expands %(name)s in most values


def render_supervisord_conf(
    config: Config,
    *,
    log_dir: Path | None = None,
    python: str = sys.executable,
    alerts: bool = True,
    template: Path = TEMPLATE,
) -> str:
    """The supervisord config for ``config`` (which must have been loaded from a file).

    Every program of ``PROGRAMS`` is written (the reader pool only if ``readers.count`` > 0),
    and the alerts eventlistener unless ``alerts`` is False; what is left out is written
    commented out, with the reason. Paths are absolute; the commands run ``python -m
    lmshardd.main``, so pass the interpreter of the venv lmshard is installed in (default: this
    one).
    """
    assert config.path is not None, "render_supervisord_conf needs a config loaded from a file"
    log_dir = (log_dir or default_log_dir(config)).absolute()
    sock = config.run_dir / SUPERVISOR_SOCKET
    if len(os.fsencode(sock)) > IPC_PATH_MAX:
        raise SupervisorError(
            f"supervisord's socket {sock} is longer than the unix socket limit ({IPC_PATH_MAX} "
            "bytes)", hint="use a shorter run_dir in the config, e.g. /run/lmshard")
    config_file = _conf_value(config.path, "the config path")
    readers = config.readers > 0
    programs = [p for p in PROGRAMS if p != "readers" or readers]
    values = {
        "config": config_file,
        "config_arg": shlex.quote(config_file),
        "config_env": config_file,
        "python": shlex.quote(_conf_value(python, "the python executable")),
        "eventlistener": shlex.quote(_conf_value(EVENTLISTENER, "the eventlistener")),
        "base_dir": _conf_value(config.path.parent, "the config directory"),
        "socket": _conf_value(sock, "the run directory"),
        "pidfile": _conf_value(config.run_dir / PIDFILE_NAME, "the run directory"),
        "log_dir": _conf_value(log_dir, "the log directory"),
        "shards": str(config.shards),
        "readers": str(max(config.readers, 1)),
        "group_programs": ",".join(programs),
    }
    try:
        source = template.read_text()
    except FileNotFoundError:
        raise SupervisorError(
            f"no supervisord template at {template}",
            hint="the lmshard installation is incomplete (package data lmshard/deploy is "
            "missing): reinstall lmshard") from None
    text = string.Template(source).substitute(values)
    enabled = {"readers": readers, "alerts": alerts}

    def block(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(2)
        if name not in enabled:
            raise SupervisorError(f"{template}: unknown block {name!r}")
        if enabled[name]:
            return body
        note = f"; ({name}: off; {_OFF_REASONS[name]})\n"
        return note + "".join(f"; {line}".rstrip() + "\n" for line in body.splitlines())

    return _BLOCK_RE.sub(block, text)


def write_supervisord_conf(config: Config, *, log_dir: Path | None = None,
                           alerts: bool = True, out: Path | None = None) -> Path:
    """Render and write the supervisord config (default: next to the lmshard config)."""
    text = render_supervisord_conf(config, log_dir=log_dir, alerts=alerts)
    path = out or supervisord_conf_path(config)
    _write_atomically(path, text)
    return path


def refresh_supervisord_conf(config: Config) -> str | None:
    """Rewrite the supervisord config next to ``config`` if it no longer matches what the
    config (and this lmshard) generates, keeping its log directory and alerts choice; the
    previous file is kept as ``supervisord.conf.old``. A note for the operator if rewritten."""
    path = supervisord_conf_path(config)
    files = SupervisorFiles.read(path)
    old = path.read_text()
    text = render_supervisord_conf(config, log_dir=files.log_dir,
                                   alerts="[eventlistener:lmshard_alerts]" in old)
    if text == old:
        return None
    _write_atomically(path.with_name(path.name + ".old"), old)
    _write_atomically(path, text)
    return (f"rewrote {path}: it did not match {config.path} (previous version kept as "
            f"{path.name}.old)")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SupervisorFiles:
    """Where a generated supervisord config puts supervisord's socket, pid file and logs."""

    conf: Path
    socket: Path
    pidfile: Path
    logfile: Path
    log_dir: Path

    @classmethod
    def read(cls, conf: Path) -> SupervisorFiles:
        if not conf.is_file():
            raise ConfigError(
                f"no supervisord config at {conf}",
                hint="create it with `lmshard init DIR` or `lmshard supervisord-conf -c CONFIG`")
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
        parser.read(conf)

        def get(section: str, key: str) -> Path:
            try:
                value = parser.get(section, key)
            except (configparser.Error, KeyError) as exc:
                raise SupervisorError(f"{conf}: no [{section}] {key}") from exc
            return Path(value.replace("%%", "%"))

        logfile = get("supervisord", "logfile")
        return cls(conf=conf, socket=get("unix_http_server", "file"),
                   pidfile=get("supervisord", "pidfile"), logfile=logfile,
                   log_dir=logfile.parent)

    def directories(self) -> list[Path]:
        return [self.socket.parent, self.pidfile.parent, self.log_dir]


# --------------------------------------------------------------------------------------------
# Talking to supervisord
# --------------------------------------------------------------------------------------------


def rpc(files: SupervisorFiles) -> Any:
    """An XML-RPC proxy for supervisord on its unix socket (``proxy.supervisor.getState()``)."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{files.socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(files: SupervisorFiles) -> int | None:
    """supervisord's pid if it answers on its socket, else None."""
    if not files.socket.exists():
        return None
    try:
        return int(rpc(files).supervisor.getPID())
    except (OSError, xmlrpc.client.Error):
        return None


def process_infos(files: SupervisorFiles) -> list[dict[str, Any]]:
    """supervisord's getAllProcessInfo, each with ``fullname`` (``group:name``) added."""
    infos = rpc(files).supervisor.getAllProcessInfo()
    for info in infos:
        info["fullname"] = f"{info['group']}:{info['name']}"
    return list(infos)


def shard_process(shard: int) -> str:
    """The supervisord name of shard ``shard``'s owner, e.g. ``lmshard:shard_01``."""
    return f"{GROUP}:shard_{shard:02d}"


def shard_of_process(info: dict[str, Any]) -> int | None:
    """The shard number of an owner's process info, None for other processes."""
    match = re.fullmatch(r"shard_(\d+)", info["name"])
    return int(match.group(1)) if info["group"] == GROUP and match else None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def ensure_dirs(config: Config, files: SupervisorFiles) -> None:
    """Create the data, run (mode 0700) and log directories."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    for d in {config.run_dir, *files.directories()}:
        d.mkdir(parents=True, exist_ok=True)
    config.run_dir.chmod(0o700)


def health_client(config: Config) -> Client:
    """A client that only pings: no schema import, no local LMDB, short timeout, no retries."""
    return Client(config, Schema("lmshard-health"), timeout_ms=PING_TIMEOUT_MS, retries=0,
                  local_reads=False)


def log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, indented, or a note why there are none."""
    if not path:
        return "    (no log file)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"    (cannot read {path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (empty)"


def wait_until_up(
    config: Config,
    files: SupervisorFiles,
    *,
    timeout: float = UP_TIMEOUT,
    progress: Callable[[int, int], None] | None = None,
    still_waiting: Callable[[], bool] = lambda: True,
) -> None:
    """Wait until every process of the group is RUNNING and every owner answers a ping (from
    the pid supervisord started). Raises SupervisorError naming the first shard (or process)
    that did not come up, with the end of its log. ``still_waiting()`` returning False (a
    signal, or supervisord gone) stops the wait with SupervisorError too."""
    deadline = time.monotonic() + timeout
    up: set[int] = set()
    shown = -1
    with health_client(config) as client:
        while True:
            try:
                infos = process_infos(files)
            except (OSError, xmlrpc.client.Error) as exc:
                raise SupervisorError(f"supervisord stopped answering on {files.socket}: {exc}; "
                                      f"see {files.logfile}") from exc
            by_shard = {shard_of_process(i): i for i in infos}
            others = [i for i in infos
                      if i["group"] in (GROUP, ALERTS) and shard_of_process(i) is None]
            for info in others:
                if info["statename"] == "FATAL":
                    raise _fatal(info)
            others_ok = all(i["statename"] == "RUNNING" for i in others)
            for shard in range(config.shards):
                info = by_shard.get(shard)
                if info is None:
                    raise SupervisorError(f"supervisord has no process {shard_process(shard)}",
                                          hint=f"regenerate {files.conf}: lmshard "
                                          "supervisord-conf")
                if info["statename"] == "FATAL":
                    raise _not_up(shard, info, "could not be started (FATAL)")
                if shard in up or info["statename"] != "RUNNING":
                    continue
                try:
                    if client.ping(shard)["pid"] == info["pid"]:
                        up.add(shard)
                except ShardUnavailable:
                    pass
            if progress is not None and len(up) != shown:
                shown = len(up)
                progress(shown, config.shards)
            if len(up) == config.shards and others_ok:
                return
            if not still_waiting():
                raise SupervisorError("stopped waiting for the shards", hint="")
            if time.monotonic() > deadline:
                missing = [s for s in range(config.shards) if s not in up]
                if missing:
                    shard = missing[0]
                    raise _not_up(shard, by_shard[shard],
                                  f"did not answer a ping within {timeout:g} s")
                bad = next(i for i in others if i["statename"] != "RUNNING")
                raise SupervisorError(
                    f"{bad['fullname']} is {bad['statename']} after {timeout:g} s; log "
                    f"{bad['stdout_logfile']}:\n{log_tail(bad['stdout_logfile'])}", hint="")
            time.sleep(0.1)


def _fatal(info: dict[str, Any]) -> SupervisorError:
    log = info.get("stdout_logfile") or info.get("stderr_logfile")
    why = info.get("spawnerr") or info.get("description") or ""
    return SupervisorError(
        f"{info['fullname']} could not be started (FATAL{': ' + why if why else ''}); fix the "
        f"cause its log shows, then `lmshard up` again; log {log or '(none)'}, last lines:\n"
        f"{log_tail(log)}", hint="")


def _not_up(shard: int, info: dict[str, Any], what: str) -> SupervisorError:
    state = info["statename"]
    if info.get("description") or info.get("spawnerr"):
        state += f" ({info.get('spawnerr') or info['description']})"
    log = info.get("stdout_logfile") or "(none)"
    return SupervisorError(
        f"shard {shard} ({info['fullname']}) {what}: state {state}; fix the cause its log shows, "
        f"then `lmshard up` again; log {log}, last lines:\n{log_tail(info.get('stdout_logfile'))}",
        hint="")


# --------------------------------------------------------------------------------------------
# Starting and stopping
# --------------------------------------------------------------------------------------------


def supervisord_command(files: SupervisorFiles, *, foreground: bool = False) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisord", *(["-n"] if foreground else []),
            "-c", str(files.conf)]


def supervisorctl_command(files: SupervisorFiles, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(files.conf), *args]


def refuse_if_running(config: Config, files: SupervisorFiles) -> None:
    """Refuse to start a second supervisord, or owners next to leftover ones: a new owner
    would take over the socket path while the old one still holds the shard."""
    pid = supervisord_pid(files)
    if pid is not None:
        raise SupervisorError(
            f"already running: supervisord pid {pid} on {files.socket}",
            hint="`lmshard status` shows it, `lmshard down` stops it")
    for path in _ipc_paths(config):
        if path.is_socket() and _listening(path):
            raise SupervisorError(
                f"supervisord is not running, but a process listens on {path}: an owner left "
                "over from a supervisord that died?",
                hint=f"find it with `ss -xlp | grep {path.name}` and stop it, then `lmshard up`")


def start_daemon(config: Config, files: SupervisorFiles) -> int:
    """Start supervisord in the background (it daemonizes); its pid once it answers."""
    refuse_if_running(config, files)
    ensure_dirs(config, files)
    done = subprocess.run(supervisord_command(files), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SupervisorError(
            f"supervisord -c {files.conf} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}", hint=f"see {files.logfile}")
    # supervisord opens its socket before it forks into the background.
    deadline = time.monotonic() + 10
    while (pid := supervisord_pid(files)) is None:
        if time.monotonic() > deadline:
            raise SupervisorError(f"supervisord started but does not answer on {files.socket}",
                                  hint=f"see {files.logfile}")
        time.sleep(0.05)
    return pid


def stop(config: Config, files: SupervisorFiles, *, timeout: float = DOWN_TIMEOUT) -> list[str]:
    """Stop supervisord and every process it runs; remove stale socket files.

    Returns notes for the operator (what was found, killed or removed). A no-op apart from the
    socket cleanup if supervisord is not running.
    """
    notes: list[str] = []
    pid = supervisord_pid(files)
    children: list[int] = []
    if pid is None:
        pid = _pid_from_file(files)  # running but its socket is gone: stop it by signal
        if pid is not None:
            notes.append(f"supervisord pid {pid} does not answer on {files.socket}: sent TERM")
            os.kill(pid, signal.SIGTERM)
    else:
        children = [i["pid"] for i in process_infos(files) if i["pid"]]
        try:
            rpc(files).supervisor.shutdown()
        except (OSError, xmlrpc.client.Error) as exc:
            notes.append(f"shutdown request failed ({exc}): sent TERM to {pid}")
            os.kill(pid, signal.SIGTERM)
    if pid is not None:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise SupervisorError(f"supervisord pid {pid} still runs after {timeout:g} s",
                                      hint=f"see {files.logfile}; kill it by hand")
            time.sleep(0.05)
        notes.append(f"supervisord pid {pid} stopped")
    for child in children:
        # supervisord SIGKILLs a process that outlives stopwaitsecs; this is the last resort.
        if pid_alive(child) and _is_ours(child):
            notes.append(f"process {child} outlived supervisord: killed")
            os.kill(child, signal.SIGKILL)
    notes.extend(f"removed stale socket {p}" for p in remove_stale_sockets(config, files))
    return notes


def _pid_from_file(files: SupervisorFiles) -> int | None:
    try:
        pid = int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"supervisord" in cmdline and pid_alive(pid) else None


def _is_ours(pid: int) -> bool:
    try:
        return b"lmshard" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def remove_stale_sockets(config: Config, files: SupervisorFiles) -> list[Path]:
    """Remove the ipc socket files of ``config`` (and supervisord's) nobody listens on."""
    removed = []
    for path in [*_ipc_paths(config), files.socket]:
        if path.is_socket() and not _listening(path):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _ipc_paths(config: Config) -> list[Path]:
    """Every ipc socket file the service binds, each reader's included."""
    eps = [ep for _key, ep in config.all_endpoints()] + config.reader_endpoints()
    return sorted({Path(ep[len("ipc://"):]) for ep in eps if ep.startswith("ipc://")})


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. a full backlog: someone is there
        return True
