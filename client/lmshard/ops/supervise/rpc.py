"""Talking to a running supervisord through its XML-RPC interface on its unix socket: whether it
runs, what its processes are doing, and waiting until every shard owner (on a replica host:
every replica of this host's copies) answers a ping."""

from __future__ import annotations

import os
import re
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmshard.client import Client
from lmshard.config import Config, owner_program
from lmshard.errors import ShardUnavailable
from lmshard.ops.supervise import SupervisorError
from lmshard.ops.supervise.conf import ADDED_GROUP, ALERTS, GROUP, SupervisorFiles
from lmshard.schema import Schema

UP_TIMEOUT = 60.0
"""Seconds ``lmshard up`` waits for every owner to answer a ping."""
PING_TIMEOUT_MS = 250
"""How long one health ping waits for an owner."""
LOG_TAIL_LINES = 20
"""Lines of a process log shown when it does not come up."""
POLL_INTERVAL = 0.1
"""Seconds between two looks at supervisord's processes while waiting for them."""


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


shard_process = owner_program
"""The supervisord name of shard ``shard``'s owner, e.g. ``lmshard:shard_01``."""


def shard_of_process(info: dict[str, Any]) -> int | None:
    """The shard number of an owner's (or a replica host's replica's) process info, None for
    other processes. An owner ``lmshard reshard`` added while supervisord ran is in a group of
    its own (``lmshard_04:shard_04``, ``lmshard.ops.supervise.conf.ADDED_GROUP``)."""
    match = re.fullmatch(r"(?:shard|replica)_(\d+)", info["name"])
    if match is None:
        return None
    n = int(match.group(1))
    return n if info["group"] in (GROUP, ADDED_GROUP.format(shard=n)) else None


def copy_health(config: Config, client: Client, shard: int) -> dict[str, Any]:
    """The health of this host's copy of ``shard``: its owner's ping answer, or on a replica
    host (``replica.local``) its replica's. ShardUnavailable when it does not answer."""
    if not config.replica_local:
        return client.ping(shard)
    from lmshard.copies import ping_copies

    t = time.perf_counter()
    a = ping_copies(config, shard, [config.replica_local], PING_TIMEOUT_MS / 1000)
    answer = a[config.replica_local]
    if answer.health is None:
        raise ShardUnavailable(f"shard {shard}'s copy {config.replica_local} does not answer: "
                               f"{answer.error}")
    h = dict(answer.health)
    h["rtt_ms"] = (time.perf_counter() - t) * 1000
    return h


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
            look = _Look.take(config, files)
            others_ok = look.others_running()
            for shard in range(config.shards):
                if look.owner_answers(client, shard, answered=shard in up):
                    up.add(shard)
            if progress is not None and len(up) != shown:
                shown = len(up)
                progress(shown, config.shards)
            if len(up) == config.shards and others_ok:
                return
            if not still_waiting():
                raise SupervisorError("stopped waiting for the shards", hint="")
            if time.monotonic() > deadline:
                raise look.timed_out(config.shards, up, timeout)
            time.sleep(POLL_INTERVAL)


class _Look:
    """One look at supervisord's processes while waiting for the service to come up."""

    def __init__(self, config: Config, files: SupervisorFiles,
                 infos: list[dict[str, Any]]) -> None:
        self.config = config
        self.local = config.replica_local
        self.files = files
        self.by_shard = {shard_of_process(i): i for i in infos}
        self.others = [i for i in infos
                       if i["group"] in (GROUP, ALERTS) and shard_of_process(i) is None]

    @classmethod
    def take(cls, config: Config, files: SupervisorFiles) -> _Look:
        try:
            return cls(config, files, process_infos(files))
        except (OSError, xmlrpc.client.Error) as exc:
            raise SupervisorError(f"supervisord stopped answering on {files.socket}: {exc}; "
                                  f"see {files.logfile}") from exc

    def others_running(self) -> bool:
        """Whether the reader pool, the monitor and the alerts listener all run; raises for the
        first one that went FATAL."""
        for info in self.others:
            if info["statename"] == "FATAL":
                raise _fatal(info)
        return all(i["statename"] == "RUNNING" for i in self.others)

    def owner_answers(self, client: Client, shard: int, *, answered: bool) -> bool:
        """Whether ``shard``'s owner answers a ping from the pid supervisord started (pinged
        only if it has not ``answered`` before); raises if supervisord has no such process, or
        could not start it."""
        info = self.by_shard.get(shard)
        if info is None:
            name = shard_process(shard)
            if config_local := self.local:
                name = f"{GROUP}:replica_{shard:02d} (replica {config_local})"
            raise SupervisorError(f"supervisord has no process {name}",
                                  hint=f"regenerate {self.files.conf}: lmshard supervisord-conf")
        if info["statename"] == "FATAL":
            raise _not_up(shard, info, "could not be started (FATAL)")
        if answered:
            return True
        if info["statename"] != "RUNNING":
            return False
        try:
            return bool(copy_health(self.config, client, shard)["pid"] == info["pid"])
        except ShardUnavailable:
            return False

    def timed_out(self, shards: int, up: set[int], timeout: float) -> SupervisorError:
        """The error naming the first shard (else other process) still not up."""
        missing = [s for s in range(shards) if s not in up]
        if missing:
            shard = missing[0]
            return _not_up(shard, self.by_shard[shard],
                           f"did not answer a ping within {timeout:g} s")
        bad = next(i for i in self.others if i["statename"] != "RUNNING")
        return SupervisorError(
            f"{bad['fullname']} is {bad['statename']} after {timeout:g} s; log "
            f"{bad['stdout_logfile']}:\n{log_tail(bad['stdout_logfile'])}", hint="")


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
