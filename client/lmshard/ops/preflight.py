"""Checks ``lmshard init`` and ``lmshard up`` run before they start anything.

What would otherwise surface only after supervisord had retried a process for many seconds is
found here in well under a second, with the message the process itself would log: a schema
module that does not import, a unique index the shards cannot enforce, a schema that conflicts
with the data already on disk (key or value types, placement, slot map, schema name), a monitor
HTTP port another process holds.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from lmshard.config import Config, ConfigError, format_http
from lmshard.shard_identity import check_shard_identity
from lmshard.store_meta import check_stored_schema, read_meta


def check_schema(config: Config) -> Any:
    """Import the config's schema and check it against the shard count and every shard's data
    on disk; the schema. Raises ConfigError (import) or the table layer's typed errors."""
    schema = config.load_schema()
    if not hasattr(schema, "tables") or not hasattr(schema, "check_sharded"):
        raise ConfigError(
            f"schema = {config.schema!r} names a {type(schema).__name__}, not an "
            "lmshard.Schema", key="schema", file=config.path,
            hint="name the module attribute that holds lmshard.Schema(...)")
    schema.check_sharded(config.shards)
    for shard in range(config.shards):
        path = config.shard_dir(shard)
        meta = read_meta(path)
        if meta:
            check_stored_schema(schema, meta, path)
            check_shard_identity(config, shard, schema, meta, path)
    return schema


def check_monitor_http(config: Config) -> None:
    """Refuse to start when ``monitor.http`` cannot be bound: another service's monitor (or
    anything else) on that port would otherwise answer scrapes in ours' place."""
    if config.monitor_http is None or config.monitor_http[1] == 0:
        return
    host, port = config.monitor_http
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = format_http(config.monitor_http)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as http.server does, so a port in TIME_WAIT from our own last run is not "in use"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{where} is already in use by another process, so the monitor cannot "
                    "serve /metrics there", key="monitor.http", file=config.path,
                    hint=f"`ss -ltnp 'sport = :{port}'` shows who holds it; set [monitor] "
                    'http to a free HOST:PORT, or "off"') from None
            raise ConfigError(f"cannot bind {where}: {exc.strerror or exc}",
                              key="monitor.http", file=config.path,
                              hint='use an address of this host, or "off"') from None


def check_all(config: Config) -> Any:
    """Every check above; the schema."""
    schema = check_schema(config)
    check_monitor_http(config)
    return schema
