"""The lmshard config file (TOML): shards, paths, sizes, durability, endpoints, client settings.

Which file (first match wins; see ``find_config``):

1. the ``path`` argument (the CLI's ``--config``),
2. the environment variable ``LMSHARD_CONFIG``,
3. ``config/lmshard.toml`` under the current directory.

There is no silent fallback: if none of these names an existing file, ``load_config`` raises
``ConfigError``. Code that wants the built-in defaults without a file (tests, ``lmshard init``)
calls ``make_config()`` / ``Config.default()``.

Relative paths in a file (``data_dir``, ``run_dir``, ``python_path``, ``curve.*``) are relative
to the directory that contains the file, never to the current directory; that is why the default
``config/lmshard.toml`` says ``data_dir = "../var/data"``. For ``make_config`` they are relative
to its ``base_dir`` argument (default: the current directory).

Every key is declared once, as a field of ``Config`` (``model``): its key, kind, limits, default
and doc. Parsing, the error messages, ``Config.to_toml`` and ``config/lmshard.toml`` (rendered by
``python -m lmshard.config``) all come from that declaration. Every problem is reported as
``ConfigError`` naming the file and the dotted key (``shards``, ``durability.sync``,
``shard.endpoint[2]``), what was wrong and what is expected.

The modules: ``model`` (Config and its declarations), ``settings`` (what a declaration is and
how values are read through it), ``kinds`` (the kinds of values), ``dotted`` (dotted keys and
did-you-mean), ``endpoints``, ``sizes``, ``errors``, ``files`` (finding and reading the file),
``schema_import``, ``writing`` (TOML out).
"""

from lmshard.config.endpoints import (
    DEFAULT_MONITOR_HTTP,
    IPC_PATH_MAX,
    derive_reader_endpoint,
    format_http,
    is_loopback,
    parse_http,
    split_host_port,
)
from lmshard.config.errors import ConfigError
from lmshard.config.files import DEFAULT_CONFIG, ENV_VAR, find_config, load_config
from lmshard.config.model import (
    DEFAULT_BACKUP_ENDPOINT,
    DEFAULT_MONITOR_ENDPOINT,
    DEFAULT_READER_ENDPOINT,
    DEFAULT_SHARD_ENDPOINT,
    DEFAULT_STAT_ENDPOINT,
    FIELD_KEYS,
    MAX_READER_SLOTS,
    MAX_SHARDS,
    MAX_SLOTS,
    MAX_TIMEOUT_MS,
    MIN_STATS_INTERVAL,
    READER_SLOT_SIZE,
    SETTINGS,
    SUPERVISOR_GROUP,
    SUPERVISOR_SOCKET,
    Config,
    CurveConfig,
    check_reader_endpoints,
    make_config,
    owner_program,
)
from lmshard.config.sizes import PAGE_SIZE, parse_size

_SPEC = SETTINGS  # the name tests/test_config.py knows it by

__all__ = [
    "DEFAULT_BACKUP_ENDPOINT",
    "DEFAULT_CONFIG",
    "DEFAULT_MONITOR_ENDPOINT",
    "DEFAULT_MONITOR_HTTP",
    "DEFAULT_READER_ENDPOINT",
    "DEFAULT_SHARD_ENDPOINT",
    "DEFAULT_STAT_ENDPOINT",
    "ENV_VAR",
    "FIELD_KEYS",
    "IPC_PATH_MAX",
    "MAX_READER_SLOTS",
    "MAX_SHARDS",
    "MAX_SLOTS",
    "MAX_TIMEOUT_MS",
    "MIN_STATS_INTERVAL",
    "PAGE_SIZE",
    "READER_SLOT_SIZE",
    "SETTINGS",
    "SUPERVISOR_GROUP",
    "SUPERVISOR_SOCKET",
    "owner_program",
    "Config",
    "ConfigError",
    "CurveConfig",
    "check_reader_endpoints",
    "derive_reader_endpoint",
    "find_config",
    "format_http",
    "is_loopback",
    "load_config",
    "make_config",
    "parse_http",
    "parse_size",
    "split_host_port",
]
