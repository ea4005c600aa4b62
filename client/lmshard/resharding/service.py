"""The config file and supervisord while a re-shard adds or removes shards.

The config is rewritten by ``Config.to_toml`` (every key under its doc comment; the previous
file is kept as ``lmshard.toml.old``) with ``shards``, ``slot_map.runs`` and ``slot_map.version``
changed, after the new config was read back and checked. Then the owners of added shards start
under the running supervisord, or those of removed shards stop, without restarting any other
owner (``sync_owners``).
"""

from __future__ import annotations

import contextlib
import subprocess
import tomllib
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmshard.config import Config, ConfigError, load_config, owner_program
from lmshard.config.model import build_config
from lmshard.ops.backup.copies import write_durably
from lmshard.ops.supervise import SupervisorError
from lmshard.ops.supervise.conf import (
    ADDED_GROUP,
    GROUP,
    SupervisorFiles,
    added_owners,
    configured_owners,
    refresh_supervisord_conf,
    remove_added_owners,
    service_files,
    write_added_owner,
)
from lmshard.ops.supervise.control import supervisorctl_command
from lmshard.ops.supervise.rpc import (
    process_infos,
    rpc,
    shard_of_process,
    supervisord_pid,
    wait_until_up,
)
from lmshard.routing import SlotMap
from lmshard.slot_routes import grown_config

SUPERVISORCTL_TIMEOUT = 120.0
"""Seconds ``supervisorctl update`` may take (it stops the programs whose config changed)."""


def config_with(config: Config, slot_map: SlotMap, version: int) -> tuple[Config, str]:
    """``config`` with ``slot_map`` (its shard count too) at ``version``, checked, and the
    text of its file. ConfigError if the file cannot describe that many shards (endpoints
    written one per shard: add the new shards' endpoints by hand first)."""
    path = config.path
    assert path is not None, "a re-shard works on a config loaded from a file"
    raw: dict[str, Any] = tomllib.loads(path.read_text())
    raw["shards"] = slot_map.shards
    table = raw.setdefault("slot_map", {})
    table["runs"] = slot_map.runs()
    table["version"] = version
    new = build_config(raw, file=path, base_dir=path.parent)
    paths = [new.data_dir, new.run_dir, *new.python_path]
    inside = all(p.is_relative_to(path.parent) for p in paths)
    return new, new.to_toml(relative_to=path.parent if inside else None)


def config_naming(config: Config, shards: int) -> Config:
    """``config`` naming at least ``shards`` shards, to reach them all (a re-shard under way
    may have more shards than the file names yet): ``slot_routes.grown_config``, as clients
    reach the shards a re-shard added."""
    return config if shards <= config.shards else grown_config(config, shards)


def write_config(config: Config, slot_map: SlotMap, version: int) -> Config:
    """Write ``config``'s file with ``slot_map`` at ``version`` (the old file kept as
    ``.old``); the config read back from it."""
    new, text = config_with(config, slot_map, version)
    path = new.path
    assert path is not None
    old = path.with_name(path.name + ".old")
    old.write_text(path.read_text())
    write_durably(path, text.encode())
    written = load_config(path)
    if written.shards != slot_map.shards or written.slot_map != slot_map:
        raise ConfigError(f"{path} did not read back as written", file=path)
    return written


def supervised(config: Config) -> bool:
    """Whether supervisord runs this config's service."""
    try:
        return supervisord_pid(service_files(config)) is not None
    except (ConfigError, SupervisorError):
        return False


def sync_owners(config: Config, previous: int, say: Callable[[str], None]) -> None:
    """Start the owners of shards ``previous`` .. ``config.shards - 1`` (a grow) or stop those
    of shards ``config.shards`` .. ``previous - 1`` (a shrink) under the running supervisord,
    leaving the other owners alone; restart the reader pool and the monitor one process at a
    time (they serve every shard of the config); wait until every owner answers.

    supervisord restarts every process of a group whose config changed, so an added owner
    runs in a group of its own (``ADDED_GROUP``, a file in ``supervisord.d/``), and a removed
    owner of group ``lmshard`` is stopped and left out of supervisord.conf, which takes effect
    at supervisord's next start (``lmshard up`` folds the added groups back into ``lmshard``).
    """
    files = service_files(config)
    main = configured_owners(files.conf)
    if config.shards > previous:
        groups = [write_added_owner(config, n, files.log_dir)
                  for n in range(max(previous, main), config.shards)]
        _supervisorctl(files, ["reread"], say)
        _supervisorctl(files, ["update", *groups], say)
    elif config.shards < previous:
        ctl = rpc(files).supervisor
        added = set(added_owners(files.conf))
        for n in range(config.shards, previous):
            name = f"{ADDED_GROUP.format(shard=n)}:shard_{n:02d}" if n in added else \
                owner_program(n)
            with contextlib.suppress(xmlrpc.client.Fault):  # not running: nothing to stop
                ctl.stopProcess(name)
            say(f"stopped {name}")
        gone = sorted(added & set(range(config.shards, previous)))
        remove_added_owners(files.conf, gone)
        if gone:
            _supervisorctl(files, ["update", *(ADDED_GROUP.format(shard=n) for n in gone)],
                           say)
        if main > config.shards:
            note = refresh_supervisord_conf(config)
            if note:
                say(f"{note}; supervisord runs by it from its next start")
    else:
        return
    _restart_others(files, say)
    wait_until_up(config, files)


def _supervisorctl(files: SupervisorFiles, args: list[str], say: Callable[[str], None]) -> None:
    done = subprocess.run(supervisorctl_command(files, args), capture_output=True,
                          text=True, timeout=SUPERVISORCTL_TIMEOUT, stdin=subprocess.DEVNULL)
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise SupervisorError(f"supervisorctl {' '.join(args)} exited {done.returncode}: "
                              f"{out}", hint=f"see {files.logfile}")
    if out:
        say(f"supervisorctl {args[0]}: {' '.join(out.split())}")


def _restart_others(files: SupervisorFiles, say: Callable[[str], None]) -> None:
    """Restart the reader pool's processes and the monitor, one at a time."""
    ctl = rpc(files).supervisor
    for info in process_infos(files):
        if info["group"] == GROUP and shard_of_process(info) is None \
                and info["statename"] == "RUNNING":
            ctl.stopProcess(info["fullname"])
            ctl.startProcess(info["fullname"])
            say(f"restarted {info['fullname']} (it serves the new shard count)")


def retire_dirs(config: Config, first: int, last: int, version: int) -> list[Path]:
    """Rename the directories of shards ``first`` .. ``last - 1`` (removed by a shrink) to
    ``shard-NN.removed-<version>``; the new paths."""
    out = []
    for n in range(first, last):
        path = config.data_dir / f"shard-{n:02d}"
        if path.exists():
            target = path.with_name(f"{path.name}.removed-{version}")
            path.rename(target)
            out.append(target)
    return out
