"""The generated supervisord config: one per lmshard config, next to its ``lmshard.toml``.

It is rendered from ``lmshard/ops/templates/supervisord.conf.template``: a group ``lmshard`` with
one program per role (``shard`` with one process per shard, or ``replica`` on a replica host, the
reader pool and the monitor),
the alerts eventlistener, a unix socket for supervisorctl in the run directory, logs in the log
directory. ``SupervisorFiles`` reads back where a generated config puts those files.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import string
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmshard.config import (
    IPC_PATH_MAX,
    SUPERVISOR_GROUP,
    SUPERVISOR_SOCKET,
    Config,
    ConfigError,
)
from lmshard.ops.supervise import SupervisorError

GROUP = SUPERVISOR_GROUP
"""The supervisord group of every lmshard program."""
ALERTS = "lmshard_alerts"
"""The alerts eventlistener's pool (supervisord keeps eventlisteners out of groups)."""
SUPERVISORD_CONF = "supervisord.conf"
"""File name of the generated supervisord config, in the directory of the lmshard config."""
PIDFILE_NAME = "supervisord.pid"
"""supervisord's pid file, in the run directory."""
TEMPLATES = resources.files("lmshard.ops") / "templates"
"""Package data: the supervisord template, the alerts eventlistener and a systemd unit (the
checkout's ``deploy/`` is a link to this folder, the copy operators browse)."""
TEMPLATE = Path(str(TEMPLATES / "supervisord.conf.template"))
EVENTLISTENER = Path(str(TEMPLATES / "eventlistener.py"))

PROGRAMS = ("shard", "readers", "monitor")
"""The programs of group ``lmshard``, in start order: ``lmshardd owner`` once per shard, the
reader pool (``lmshardd readers``, ``readers.count`` processes; none if 0), the monitor. The
alerts eventlistener is a pool of its own (supervisord keeps eventlisteners out of groups).
On a replica host (``replica.local`` set) ``REPLICA_PROGRAM`` takes the place of ``shard``."""
REPLICA_PROGRAM = "replica"
"""The program of a replica host: ``lmshardd replica --shard N --name R`` once per shard
(``lmshard:replica_00`` ..), keeping this host's copy of each shard."""


def copy_program(config: Config) -> str:
    """The program that keeps this host's copies: ``shard`` (owners), or ``replica`` on a
    replica host."""
    return REPLICA_PROGRAM if config.replica_local else "shard"

_OFF_REASONS = {
    "readers": "readers.count is 0 in the config",
    "alerts": "switched off with --no-alerts; `lmshard supervisord-conf` switches it on",
}
_BLOCK_RE = re.compile(r"^;@begin (\w+)\n(.*?)^;@end \1\n", re.M | re.S)
_BAD_PATH_CHARS = set('\n\r";#')


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
    copies = copy_program(config)
    programs = [copies if p == "shard" else p for p in PROGRAMS if p != "readers" or readers]
    if config.replica_local:
        copy_command = (f"replica --shard %(process_num)d --name "
                        f"{shlex.quote(config.replica_local)}")
        copy_comment = (f"This host keeps replica {config.replica_local}'s copy of each shard: "
                        "lmshard:replica_00 .. replica_NN.")
    else:
        copy_command = "owner --shard %(process_num)d"
        copy_comment = "One writer per shard: lmshard:shard_00 .. shard_NN."
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
        "copy_program": copies,
        "copy_command": copy_command,
        "copy_comment": copy_comment,
    }
    try:
        source = template.read_text()
    except FileNotFoundError:
        raise SupervisorError(
            f"no supervisord template at {template}",
            hint="the lmshard installation is incomplete (package data lmshard/ops/templates is "
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
    """Render and write the supervisord config (default: next to the lmshard config). It runs
    every shard's owner, so the files of owners a re-shard added beside it go."""
    text = render_supervisord_conf(config, log_dir=log_dir, alerts=alerts)
    path = out or supervisord_conf_path(config)
    _write_atomically(path, text)
    if out is None:
        remove_added_owners(path.parent)
    return path


# -- owners a re-shard adds while supervisord runs ----------------------------------------------

ADDED_GROUP = GROUP + "_{shard:02d}"
"""The supervisord group of the owner of a shard ``lmshard reshard`` added while supervisord
ran (``lmshard_04:shard_04``): supervisord restarts every process of a group whose config
changed, so a new owner gets a group of its own and the running owners are left alone."""
ADDED_FILE = "lmshard-shard-{shard:02d}.conf"
"""The file of such a group, in ``supervisord.d/`` beside supervisord.conf (included by it)."""
_ADDED_RE = re.compile(r"lmshard-shard-(\d+)\.conf")


def added_owners_dir(conf: Path) -> Path:
    """Where the groups of added owners live: ``supervisord.d/`` beside ``conf``'s directory."""
    return conf / "supervisord.d" if conf.is_dir() else conf.parent / "supervisord.d"


def added_owners(conf_dir: Path) -> list[int]:
    """The shards whose owners run in groups of their own (files in ``supervisord.d/``)."""
    d = added_owners_dir(conf_dir)
    found = [_ADDED_RE.fullmatch(p.name) for p in d.iterdir()] if d.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def remove_added_owners(conf_dir: Path, shards: list[int] | None = None) -> None:
    """Remove the files of added owners (of ``shards``; all if None)."""
    for n in added_owners(conf_dir) if shards is None else shards:
        (added_owners_dir(conf_dir) / ADDED_FILE.format(shard=n)).unlink(missing_ok=True)


def configured_owners(conf: Path) -> int:
    """How many owners the group ``lmshard`` of the supervisord config ``conf`` runs."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(conf)
    try:
        return int(parser.get("program:shard", "numprocs"))
    except (configparser.Error, ValueError) as exc:
        raise SupervisorError(f"{conf}: no [program:shard] numprocs",
                              hint="regenerate it: lmshard supervisord-conf") from exc


def render_added_owner(config: Config, shard: int, *, log_dir: Path) -> str:
    """The supervisord config of the group of shard ``shard``'s owner (``ADDED_GROUP``): the
    program ``shard`` of the generated config, for that one shard."""
    text = render_supervisord_conf(config, log_dir=log_dir)
    match = re.search(r"^\[program:shard\]\n(.*?)(?=^\[|^;@|\Z)", text, re.M | re.S)
    if match is None:
        raise SupervisorError("the supervisord template has no [program:shard]")
    body = match.group(1)
    program = f"shard_{shard:02d}"
    body = re.sub(r"^numprocs=.*$", "numprocs=1", body, flags=re.M)
    body = re.sub(r"^numprocs_start=.*$", f"numprocs_start={shard}", body, flags=re.M)
    body = body.replace("%(program_name)s_%(process_num)02d", program)
    group = ADDED_GROUP.format(shard=shard)
    return (f"; The owner of shard {shard}, added by `lmshard reshard` while supervisord ran, in "
            f"a group of its own\n; ({group}: the running owners stay as they are). "
            "`lmshard supervisord-conf` folds it into\n; group lmshard again.\n"
            f"[group:{group}]\nprograms={program}\n\n[program:{program}]\n{body.rstrip()}\n")


def write_added_owner(config: Config, shard: int, log_dir: Path) -> str:
    """Write the group of shard ``shard``'s owner into ``supervisord.d/``; its group name."""
    d = added_owners_dir(supervisord_conf_path(config))
    d.mkdir(exist_ok=True)
    _write_atomically(d / ADDED_FILE.format(shard=shard),
                      render_added_owner(config, shard, log_dir=log_dir))
    return ADDED_GROUP.format(shard=shard)


def refresh_supervisord_conf(config: Config) -> str | None:
    """Rewrite the supervisord config next to ``config`` if it no longer matches what the
    config (and this lmshard) generates, keeping its log directory and alerts choice; the
    previous file is kept as ``supervisord.conf.old``; the groups of owners a re-shard added
    (``supervisord.d/lmshard-shard-NN.conf``) are folded into it. A note for the operator if
    rewritten. Only while supervisord does not run."""
    path = supervisord_conf_path(config)
    files = SupervisorFiles.read(path)
    old = path.read_text()
    text = render_supervisord_conf(config, log_dir=files.log_dir,
                                   alerts="[eventlistener:lmshard_alerts]" in old)
    if text == old and not added_owners(path.parent):
        return None
    _write_atomically(path.with_name(path.name + ".old"), old)
    _write_atomically(path, text)
    remove_added_owners(path.parent)
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
        """The files named in the supervisord config ``conf``; ConfigError if it is missing."""
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
        """The directories these files live in (created before supervisord starts)."""
        return [self.socket.parent, self.pidfile.parent, self.log_dir]


def service_files(config: Config) -> SupervisorFiles:
    """Where the supervisord config next to ``config`` puts supervisord's files."""
    return SupervisorFiles.read(supervisord_conf_path(config))
