"""Starting and stopping supervisord (in the background, or in the foreground under a service
manager or a terminal), and cleaning up after processes that died: stale socket files, owners
that outlived supervisord."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from types import FrameType

from lmshard.config import Config
from lmshard.ops.supervise import SupervisorError
from lmshard.ops.supervise.conf import SupervisorFiles
from lmshard.ops.supervise.rpc import process_infos, rpc, supervisord_pid

DOWN_TIMEOUT = 90.0
"""Seconds ``lmshard down`` waits for supervisord to exit (it waits stopwaitsecs per process)."""
START_TIMEOUT = 10.0
"""Seconds a started supervisord has to answer on its socket."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a foreground supervisord (passed on to it as TERM)."""


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


def supervisord_command(files: SupervisorFiles, *, foreground: bool = False) -> list[str]:
    """How to run supervisord on ``files.conf`` with this interpreter (``-n``: foreground)."""
    return [sys.executable, "-m", "supervisor.supervisord", *(["-n"] if foreground else []),
            "-c", str(files.conf)]


def supervisorctl_command(files: SupervisorFiles, args: list[str]) -> list[str]:
    """How to run supervisorctl ``args`` on ``files.conf`` with this interpreter."""
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
    deadline = time.monotonic() + START_TIMEOUT
    while (pid := supervisord_pid(files)) is None:
        if time.monotonic() > deadline:
            raise SupervisorError(f"supervisord started but does not answer on {files.socket}",
                                  hint=f"see {files.logfile}")
        time.sleep(0.05)
    return pid


class ForegroundSupervisord:
    """supervisord as a child in the foreground (``supervisord -n``), for ``lmshard up
    --foreground``: INT, TERM or HUP sent to this process stop it.

    Ctrl-C reaches supervisord too (same process group); TERM from a service manager reaches
    only us. supervisord shuts down on either, so TERM is always passed on. Leaving the ``with``
    block while it still runs (something unexpected happened) stops it too.
    """

    def __init__(self, config: Config, files: SupervisorFiles) -> None:
        refuse_if_running(config, files)
        ensure_dirs(config, files)
        self.files = files
        self.signals: list[int] = []
        self.proc = subprocess.Popen(supervisord_command(files, foreground=True),
                                     stdin=subprocess.DEVNULL)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._forward)

    def __enter__(self) -> ForegroundSupervisord:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.terminate()
            self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stopped_by_signal(self) -> bool:
        """Whether this process was told to stop (INT, TERM or HUP)."""
        return bool(self.signals)

    def running(self) -> bool:
        """Neither told to stop nor exited."""
        return not self.signals and self.proc.poll() is None

    def terminate(self) -> None:
        """Send supervisord TERM (it stops every process it runs, then exits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_for_socket(self) -> None:
        """Wait until supervisord answers on its socket; SupervisorError if it exits, is told
        to stop or does not answer within START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        while supervisord_pid(self.files) is None:
            if not self.running() or time.monotonic() > deadline:
                raise SupervisorError(f"supervisord did not start; see {self.files.logfile}")
            time.sleep(0.05)

    def wait(self) -> int:
        """supervisord's exit code (negative: the signal that ended it), once it exited."""
        return self.proc.wait()

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        self.terminate()


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
    """Every ipc socket file the service binds on this host: this host's copy of each shard's
    (``replica.local``), each reader's and the monitor's."""
    eps = [ep for n in range(config.shards)
           for ep in config.member(n, config.local_member).endpoints()]
    eps += [*config.reader_endpoints(), config.monitor_endpoint]
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
