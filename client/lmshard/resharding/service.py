"""The config file and supervisord while a re-shard adds or removes shards.

The config is rewritten by ``Config.to_toml`` (every key under its doc comment; the previous
file is kept as ``lmshard.toml.old``) with ``shards``, ``slot_map.runs`` and ``slot_map.version``
changed, after the new config was read back and checked. supervisord's config is then
regenerated beside it and ``supervisorctl reread`` + ``update`` start the owners of added shards
and stop those of removed ones. supervisord restarts every program of the group ``lmshard``
whose config changed (the owners included, when the shard count changes): clients ride that
out with their usual retries, and the re-shard waits until every owner answers again.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from lmshard.config import Config, ConfigError, load_config
from lmshard.config.model import build_config
from lmshard.ops.supervise import SupervisorError
from lmshard.ops.supervise.conf import refresh_supervisord_conf, service_files
from lmshard.ops.supervise.control import supervisorctl_command
from lmshard.ops.supervise.rpc import supervisord_pid, wait_until_up
from lmshard.routing import SlotMap

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
    may have more shards than the file names yet)."""
    if shards <= config.shards:
        return config
    wide = SlotMap(shards, config.slots, config.slot_map.assignment, empty_ok=True)
    return config_with(config, wide, config.slot_map_version or 1)[0]


def write_config(config: Config, slot_map: SlotMap, version: int) -> Config:
    """Write ``config``'s file with ``slot_map`` at ``version`` (the old file kept as
    ``.old``); the config read back from it."""
    new, text = config_with(config, slot_map, version)
    path = new.path
    assert path is not None
    old = path.with_name(path.name + ".old")
    old.write_text(path.read_text())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def update_supervisord(config: Config, say: Any) -> None:
    """Regenerate supervisord.conf for ``config``, ``supervisorctl reread`` and ``update``
    (owners of added shards start, those of removed shards stop), and wait until every
    owner of ``config`` answers."""
    note = refresh_supervisord_conf(config)
    if note:
        say(note)
    files = service_files(config)
    for args in (["reread"], ["update"]):
        done = subprocess.run(supervisorctl_command(files, args), capture_output=True,
                              text=True, timeout=SUPERVISORCTL_TIMEOUT, stdin=subprocess.DEVNULL)
        out = (done.stdout + done.stderr).strip()
        if done.returncode != 0 and "No config updates" not in out:
            raise SupervisorError(f"supervisorctl {' '.join(args)} exited {done.returncode}: "
                                  f"{out}", hint=f"see {files.logfile}")
        if out:
            say(f"supervisorctl {args[0]}: {' '.join(out.split())}")
    wait_until_up(config, files)


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
