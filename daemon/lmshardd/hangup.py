"""What every lmshardd process (owner, reader, monitor) does on SIGHUP: report, not apply.

Each role's handler only sets a flag, and its loop, between requests, calls ``report_hangup``.
Nothing is re-opened or re-bound: each process logs to stdout/stderr, captured by supervisord,
so it has no log file to reopen, and its settings take effect only when it starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from lmshard import config as config_module
from lmshard.config import Config, ConfigError, load_config

log = logging.getLogger("lmshardd.hangup")

CONFIG_KEYS: dict[str, str] = config_module.FIELD_KEYS
"""``Config`` field -> the config file key it comes from (a field not listed: its own name)."""
CLIENT_KEYS = frozenset({"client.timeout_ms", "client.retries", "client.local_reads"})
"""Keys no lmshardd process uses: each client reads them when it loads the config."""


def config_changes(old: Config, new: Config) -> list[str]:
    """The config file keys whose values differ between ``old`` and ``new``, sorted."""
    changed: set[str] = set()
    for f in dataclasses.fields(Config):
        if f.name == "path":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a) or dataclasses.is_dataclass(b):  # a table: curve
            kind = type(a) if a is not None else type(b)
            changed.update(f"{f.name}.{sub.name}" for sub in dataclasses.fields(kind)
                           if getattr(a, sub.name, None) != getattr(b, sub.name, None))
        else:
            changed.add(CONFIG_KEYS.get(f.name, f.name))
    return sorted(changed)


def supervisor_name(default: str) -> str:
    """This process's supervisord name, ``group:name``: supervisord tells its children in
    SUPERVISOR_GROUP_NAME and SUPERVISOR_PROCESS_NAME; ``lmshard:<default>`` otherwise."""
    name = os.environ.get("SUPERVISOR_PROCESS_NAME")
    if not name:
        return f"lmshard:{default}"
    return f"{os.environ.get('SUPERVISOR_GROUP_NAME') or name}:{name}"


def report_hangup(config: Config, process: str, logger: logging.Logger = log
                  ) -> list[str] | None:
    """What a process does on SIGHUP: re-read its config file and log one line on ``logger``
    saying whether it changed since the process read it at start. Nothing is applied: the
    process keeps running with the config it started with. ``process`` is its supervisord name
    without the group, e.g. ``shard_01``. The changed keys; None if the file does not load."""
    if config.path is None:
        logger.info("received SIGHUP: no config file to re-read (config built in-process)")
        return []
    try:
        new = load_config(config.path)
        changed = config_changes(config, new)
    except Exception as exc:  # a broken file must not take a serving process down
        why = str(exc) if isinstance(exc, ConfigError) else f"{config.path}: {exc!r}"
        logger.warning("received SIGHUP: the config does not load, ignored (still running "
                       "with the config read at start): %s", why)
        return None
    if not changed:
        logger.info("received SIGHUP: config unchanged (%s)", config.path)
        return changed
    daemon = [k for k in changed if k not in CLIENT_KEYS]
    client = [k for k in changed if k in CLIENT_KEYS]
    parts = []
    if daemon:
        parts.append(f"{', '.join(daemon)} take{'s' if len(daemon) == 1 else ''} effect only "
                     f"after a restart: `lmshard ctl restart {supervisor_name(process)}`")
        if new.slot_map != config.slot_map:
            parts.append("the slot map differs: owners refuse to start on data written with "
                         "another one")
    if client:
        parts.append(f"{', '.join(client)} {'is' if len(client) == 1 else 'are'} read by "
                     "clients when they load the config (no restart)")
    logger.info("received SIGHUP: config %s changed: %s", config.path, "; ".join(parts))
    return changed
