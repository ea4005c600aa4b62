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

Every key, its type and default is documented in ``config/lmshard.toml``; ``_SPEC`` below is the
machine-readable list. Every problem is reported as ``ConfigError`` naming the file and the dotted
key (``shards``, ``durability.sync``, ``shard.endpoint[2]``), what was wrong and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import ipaddress
import mmap
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import Any

from lmshard.errors import Error
from lmshard.routing import DEFAULT_SLOTS, SlotMap

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_VAR",
    "Config",
    "ConfigError",
    "CurveConfig",
    "find_config",
    "load_config",
    "make_config",
    "parse_size",
]

#: Environment variable naming the config file (used when no path is passed).
ENV_VAR = "LMSHARD_CONFIG"
#: Default config file, relative to the current directory.
DEFAULT_CONFIG = Path("config") / "lmshard.toml"

MAX_SHARDS = 256
MIN_STATS_INTERVAL = 0.01
"""Shortest stats interval, in seconds: shorter would make the owners spin publishing."""
MAX_TIMEOUT_MS = 3_600_000
"""Longest client timeout: one hour (ZeroMQ timeouts are C ints of milliseconds)."""
MAX_READER_SLOTS = 65536
"""Most LMDB reader slots per shard: each is 64 bytes of every shard's lock file (4 MiB here),
far more than the read transactions one host keeps open at once."""
READER_SLOT_SIZE = 64
"""Bytes of a shard's lock file per reader slot (LMDB's MDB_reader, one cache line)."""
#: Upper bound for ``slots``: keeps slot maps small (one entry per slot) and digests cheap.
MAX_SLOTS = 65536
#: LMDB map sizes are rounded *up* to a multiple of this (the OS page size).
PAGE_SIZE = mmap.PAGESIZE
#: Longest path a unix socket address can hold (``sun_path`` minus the terminating NUL).
IPC_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

DEFAULT_SHARD_ENDPOINT = "ipc://{run_dir}/shard-{shard:02d}.sock"
DEFAULT_STAT_ENDPOINT = "ipc://{run_dir}/stat-{shard:02d}.sock"
DEFAULT_BACKUP_ENDPOINT = "ipc://{run_dir}/backup-{shard:02d}.sock"
DEFAULT_READER_ENDPOINT = "ipc://{run_dir}/readers.sock"
DEFAULT_MONITOR_ENDPOINT = "ipc://{run_dir}/monitor.sock"
SUPERVISOR_SOCKET = "supervisor.sock"
"""supervisord's unix socket (supervisorctl, XML-RPC), in the run directory."""
DEFAULT_MONITOR_HTTP = "127.0.0.1:9464"
"""Where the monitor serves /metrics and /stats (9464: a port commonly used by exporters)."""


class ConfigError(Error, ValueError):
    """The config file is missing, unreadable, not TOML, or has a bad key or value.

    ``key`` is the dotted key (``durability.sync``) or None; ``file`` the config file or None
    (config built by ``make_config``); ``line`` is set for TOML syntax errors.
    """

    code = 50
    hint = ""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        file: str | os.PathLike[str] | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.file = Path(file) if file is not None else None
        self.line = line
        self.detail = message
        prefix = ""
        if file is not None:
            prefix = f"{file}:{line}: " if line is not None else f"{file}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, hint=hint)


# --------------------------------------------------------------------------------------------
# The keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    default: Any  # the value as it would be written in TOML; None = unset
    help: str


_SPEC: dict[str, _Key] = {
    "shards": _Key(4, "number of shards (LMDB environments), 1 to 256; fixed once data exists"),
    "slots": _Key(DEFAULT_SLOTS, "hash slots, shards to 65536; fixed once data exists"),
    "data_dir": _Key("var/data", "directory holding one sub-directory per shard (shard-NN)"),
    "run_dir": _Key("var/run", "directory for ipc sockets and pid files (mode 0700)"),
    "schema": _Key("lmshard.demo:schema", 'the schema object, as "package.module:attr"'),
    "python_path": _Key([], "directories prepended to sys.path to import the schema module"),
    "storage.map_size": _Key("64MiB", "initial LMDB map size per shard (rounded up to pages)"),
    "storage.max_map_size": _Key("8GiB", "cap the owner grows the map to on MapFullError"),
    "storage.max_readers": _Key(126, "LMDB reader slots per shard (concurrent read txns)"),
    "durability.sync": _Key(True, "fsync on commit; false risks the last commits on OS crash"),
    "durability.metasync": _Key(True, "fsync the meta page on commit (only matters if sync)"),
    "readers.count": _Key(2, "reader pool processes serving remote reads; 0 disables"),
    "readers.endpoint": _Key(DEFAULT_READER_ENDPOINT, "the reader pool's request endpoint"),
    "monitor.endpoint": _Key(DEFAULT_MONITOR_ENDPOINT, "the monitor's endpoint"),
    "monitor.stats_interval": _Key(1.0, "seconds between stat.<shard> messages"),
    "monitor.http": _Key(DEFAULT_MONITOR_HTTP, 'HOST:PORT of /metrics and /stats, or "off"'),
    "client.timeout_ms": _Key(2000, "how long a client waits for an ack before retrying"),
    "client.retries": _Key(3, "retries after a timeout before the client gives up"),
    "client.local_reads": _Key(True, "read shards in-process via LMDB (same host only)"),
    "shard.endpoint": _Key(DEFAULT_SHARD_ENDPOINT, "each shard owner's write endpoint"),
    "shard.stat_endpoint": _Key(DEFAULT_STAT_ENDPOINT, "each owner's stats PUB endpoint"),
    "shard.backup_endpoint": _Key(DEFAULT_BACKUP_ENDPOINT, "each owner's backup endpoint"),
    "shard.base_port": _Key(None, "{port} in shard.endpoint is base_port + shard"),
    "shard.stat_base_port": _Key(None, "{port} in shard.stat_endpoint is stat_base_port + shard"),
    "shard.backup_base_port": _Key(None, "{port} in shard.backup_endpoint is this + shard"),
    "slot_map.runs": _Key(None, "explicit slot map: [[first, end (exclusive), shard], ...]"),
    "curve.server_secret_key": _Key(None, "owner/reader/monitor CURVE secret certificate"),
    "curve.server_public_key": _Key(None, "the servers' CURVE public certificate (clients)"),
    "curve.client_secret_key": _Key(None, "this client's CURVE secret certificate"),
    "curve.allowed_client_keys": _Key(None, "directory of client public certificates allowed in"),
}
_TABLES = frozenset(key.rpartition(".")[0] for key in _SPEC if "." in key)

#: ``make_config`` keyword -> dotted key.
_FIELD_KEYS: dict[str, str] = {
    "shards": "shards",
    "slots": "slots",
    "data_dir": "data_dir",
    "run_dir": "run_dir",
    "schema": "schema",
    "python_path": "python_path",
    "map_size": "storage.map_size",
    "max_map_size": "storage.max_map_size",
    "max_readers": "storage.max_readers",
    "sync": "durability.sync",
    "metasync": "durability.metasync",
    "readers": "readers.count",
    "reader_endpoint": "readers.endpoint",
    "monitor_endpoint": "monitor.endpoint",
    "stats_interval": "monitor.stats_interval",
    "monitor_http": "monitor.http",
    "timeout_ms": "client.timeout_ms",
    "retries": "client.retries",
    "local_reads": "client.local_reads",
    "endpoints": "shard.endpoint",
    "stat_endpoints": "shard.stat_endpoint",
    "backup_endpoints": "shard.backup_endpoint",
    "base_port": "shard.base_port",
    "stat_base_port": "shard.stat_base_port",
    "backup_base_port": "shard.backup_base_port",
    "slot_map": "slot_map.runs",
}


# --------------------------------------------------------------------------------------------
# The config objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveConfig:
    """CURVE key locations (``[curve]``), used by the security feature; paths are not checked
    for existence here. Certificates are ``zmq.auth`` certificate files."""

    server_secret_key: Path | None = None
    server_public_key: Path | None = None
    client_secret_key: Path | None = None
    allowed_client_keys: Path | None = None


@dataclass(frozen=True)
class Config:
    """A validated config. Build with ``load_config`` (file) or ``make_config`` (no file)."""

    path: Path | None
    data_dir: Path
    run_dir: Path
    shards: int
    slots: int
    slot_map: SlotMap
    map_size: int
    max_map_size: int
    sync: bool
    metasync: bool
    max_readers: int
    schema: str
    python_path: tuple[Path, ...]
    readers: int
    reader_endpoint: str
    monitor_endpoint: str
    stats_interval: float
    timeout_ms: int
    retries: int
    local_reads: bool
    endpoints: tuple[str, ...]
    stat_endpoints: tuple[str, ...]
    backup_endpoints: tuple[str, ...]
    curve: CurveConfig | None = None
    monitor_http: tuple[str, int] | None = ("127.0.0.1", 9464)
    """(host, port) of the monitor's HTTP server; None: no HTTP server."""

    @classmethod
    def default(cls, *, base_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
        """Same as ``make_config``: the built-in defaults plus ``overrides``, validated."""
        return make_config(base_dir=base_dir, **overrides)

    # -- per shard ----------------------------------------------------------------------------

    def _check_shard(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < self.shards:
            raise ValueError(f"shard {n!r} out of range: expected 0 to {self.shards - 1}")
        return n

    def shard_dir(self, n: int) -> Path:
        """The LMDB environment directory of shard ``n``: ``data_dir / "shard-NN"``."""
        return self.data_dir / f"shard-{self._check_shard(n):02d}"

    def endpoint(self, n: int) -> str:
        """Shard ``n`` owner's write endpoint (ROUTER; clients connect DEALERs)."""
        return self.endpoints[self._check_shard(n)]

    def stat_endpoint(self, n: int) -> str:
        """Shard ``n`` owner's stats PUB endpoint."""
        return self.stat_endpoints[self._check_shard(n)]

    def backup_endpoint(self, n: int) -> str:
        """Shard ``n`` owner's backup endpoint."""
        return self.backup_endpoints[self._check_shard(n)]

    def all_endpoints(self) -> list[tuple[str, str]]:
        """Every endpoint as ``(dotted key, endpoint)``, e.g. ``("shard.endpoint[0]", ...)``."""
        out: list[tuple[str, str]] = []
        for key, eps in (
            ("shard.endpoint", self.endpoints),
            ("shard.stat_endpoint", self.stat_endpoints),
            ("shard.backup_endpoint", self.backup_endpoints),
        ):
            out.extend((f"{key}[{n}]", ep) for n, ep in enumerate(eps))
        out.append(("readers.endpoint", self.reader_endpoint))
        out.append(("monitor.endpoint", self.monitor_endpoint))
        return out

    def reader_endpoints(self) -> list[str]:
        """Every reader's endpoint, reader I's at index I (``reader_endpoint`` for I = 0; see
        ``derive_reader_endpoint``); empty when ``readers.count`` is 0."""
        return [derive_reader_endpoint(self.reader_endpoint, i) for i in range(self.readers)]

    def non_loopback_endpoints(self) -> list[tuple[str, str]]:
        """The tcp endpoints not on a loopback address, as ``(dotted key, endpoint)``.

        Allowed by the config, but they are reachable from other hosts: the security feature
        requires CURVE for them, and the CLI warns about them.
        """
        out = []
        for key, ep in self.all_endpoints():
            if ep.startswith("tcp://"):
                host, _port = _split_host_port(ep[len("tcp://") :])
                if not is_loopback(host):
                    out.append((key, ep))
        return out

    # -- schema -------------------------------------------------------------------------------

    def load_schema(self) -> Any:
        """Import and return the schema object named by ``schema`` ("package.module:attr").

        Prepends ``python_path`` to ``sys.path`` (each directory once per process) first.
        Raises ``ConfigError`` naming the module, the attribute and the config file.
        """
        new = [d for d in dict.fromkeys(map(str, self.python_path)) if d not in sys.path]
        sys.path[0:0] = new
        module_name, _, attr = self.schema.partition(":")
        where = f"schema = {self.schema!r}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"{where}: cannot import module {module_name!r} ({exc}); searched python_path "
                f"{[str(p) for p in self.python_path]} and sys.path",
                key="schema",
                file=self.path,
                hint="add the directory containing the module to python_path",
            ) from exc
        except Exception as exc:
            raise ConfigError(
                f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
                key="schema",
                file=self.path,
                hint="fix the error in the schema module",
            ) from exc
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as exc:
                raise ConfigError(
                    f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                    f"no attribute {attr!r}",
                    key="schema",
                    file=self.path,
                    hint="name the object that holds the schema after the colon",
                ) from exc
        return obj

    # -- writing ------------------------------------------------------------------------------

    def to_toml(self, relative_to: str | os.PathLike[str] | None = None) -> str:
        """Render this config as TOML that ``load_config`` reads back to an equal config.

        Paths are written absolute, or relative to ``relative_to`` (pass the directory the file
        will be written to). Endpoints that follow the default patterns are written as patterns.
        """
        base = Path(relative_to).resolve() if relative_to is not None else None

        def path_str(p: Path) -> str:
            return os.path.relpath(p, base) if base is not None else str(p)

        def endpoints_value(eps: tuple[str, ...], pattern: str) -> Any:
            run_dir = str(self.run_dir)
            if all(ep == pattern.format(run_dir=run_dir, shard=n) for n, ep in enumerate(eps)):
                return _Raw(_toml_str(pattern))
            return [_escape_braces(ep) for ep in eps]

        def single_endpoint(ep: str, pattern: str) -> Any:
            if ep == pattern.format(run_dir=str(self.run_dir)):
                return _Raw(_toml_str(pattern))
            return _escape_braces(ep)

        sections: list[tuple[str | None, list[tuple[str, Any]]]] = [
            (
                None,
                [
                    ("shards", self.shards),
                    ("slots", self.slots),
                    ("data_dir", path_str(self.data_dir)),
                    ("run_dir", path_str(self.run_dir)),
                    ("schema", self.schema),
                    ("python_path", [path_str(p) for p in self.python_path]),
                ],
            ),
            (
                "storage",
                [
                    ("map_size", _Raw(_toml_str(_format_size(self.map_size)))),
                    ("max_map_size", _Raw(_toml_str(_format_size(self.max_map_size)))),
                    ("max_readers", self.max_readers),
                ],
            ),
            ("durability", [("sync", self.sync), ("metasync", self.metasync)]),
            (
                "readers",
                [
                    ("count", self.readers),
                    ("endpoint", single_endpoint(self.reader_endpoint, DEFAULT_READER_ENDPOINT)),
                ],
            ),
            (
                "monitor",
                [
                    ("endpoint", single_endpoint(self.monitor_endpoint, DEFAULT_MONITOR_ENDPOINT)),
                    ("stats_interval", self.stats_interval),
                    ("http", format_http(self.monitor_http)),
                ],
            ),
            (
                "client",
                [
                    ("timeout_ms", self.timeout_ms),
                    ("retries", self.retries),
                    ("local_reads", self.local_reads),
                ],
            ),
            (
                "shard",
                [
                    ("endpoint", endpoints_value(self.endpoints, DEFAULT_SHARD_ENDPOINT)),
                    (
                        "stat_endpoint",
                        endpoints_value(self.stat_endpoints, DEFAULT_STAT_ENDPOINT),
                    ),
                    (
                        "backup_endpoint",
                        endpoints_value(self.backup_endpoints, DEFAULT_BACKUP_ENDPOINT),
                    ),
                ],
            ),
        ]
        if not self.slot_map.is_default():
            sections.append(("slot_map", [("runs", self.slot_map.runs())]))
        if self.curve is not None:
            sections.append(
                (
                    "curve",
                    [
                        (f.name, path_str(value))
                        for f in dataclasses.fields(self.curve)
                        if (value := getattr(self.curve, f.name)) is not None
                    ],
                )
            )

        lines = [
            "# lmshard configuration (written by lmshard; see config/lmshard.toml for every key).",
            "# Relative paths are relative to the directory this file is in.",
        ]
        for table, items in sections:
            lines.append("")
            if table is not None:
                lines.append(f"[{table}]")
            for name, value in items:
                dotted = f"{table}.{name}" if table else name
                lines.append(f"# {_SPEC[dotted].help}")
                lines.append(f"{name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------------------------


def find_config(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the config file to use: ``path`` > ``$LMSHARD_CONFIG`` > ``./config/lmshard.toml``.

    The result is absolute (symlinks not resolved). Raises ``ConfigError`` if the chosen file
    does not exist, saying where the name came from.
    """
    env = os.environ.get(ENV_VAR, "")
    if path is not None and os.fspath(path) != "":
        candidate, source = Path(path), "the path argument (--config)"
    elif env:
        candidate, source = Path(env), f"the environment variable {ENV_VAR}"
    else:
        candidate, source = DEFAULT_CONFIG, "the default location"
    candidate = candidate.expanduser().absolute()
    if candidate.is_file():
        return candidate
    if candidate.exists():
        raise ConfigError(
            f"config file {candidate} (from {source}) is not a regular file", file=candidate
        )
    if source == "the default location":
        raise ConfigError(
            f"no config file: none passed, {ENV_VAR} not set, and {candidate} does not exist",
            hint=f"pass --config PATH, set {ENV_VAR}, or run from the directory holding "
            "config/lmshard.toml",
        )
    raise ConfigError(f"config file {candidate} (from {source}) does not exist", file=candidate)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Find (see ``find_config``), read, parse and validate the config file."""
    file = find_config(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 at byte {exc.start}; TOML files are UTF-8", file=file
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+), column (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError(
            f"invalid TOML: {exc}", file=file, line=line, hint="fix the TOML syntax"
        ) from exc
    return _build(raw, file=file, base_dir=file.parent)


def make_config(*, base_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Build a config without a file: the built-in defaults plus ``overrides``, validated.

    Keywords are ``Config`` field names (``shards=2, data_dir=tmp_path / "data", sync=False``),
    plus ``base_port``/``stat_base_port``/``backup_base_port``. ``endpoints`` and friends take a
    pattern string or a sequence; ``slot_map`` a ``SlotMap`` (its shard and slot counts are used
    unless given) or runs; ``curve`` a ``CurveConfig`` or dict. Relative paths are relative to
    ``base_dir`` (default: the current directory). Invalid values raise ``ConfigError``.
    """
    raw: dict[str, Any] = {}
    slot_map = overrides.get("slot_map")
    if isinstance(slot_map, SlotMap):
        overrides.setdefault("shards", slot_map.shards)
        overrides.setdefault("slots", slot_map.slots)
    for name, value in overrides.items():
        if name == "curve":
            if isinstance(value, CurveConfig):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            if value is not None:
                raw["curve"] = _to_raw(value)
            continue
        key = _FIELD_KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, [*_FIELD_KEYS, "curve"], n=1)
            raise ConfigError(
                f"make_config() got an unknown keyword {name!r}"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                key=name,
            )
        if value is None:
            continue
        if isinstance(value, SlotMap):
            value = value.runs()
        table, _, leaf = key.rpartition(".")
        target = raw.setdefault(table, {}) if table else raw
        target[leaf] = _to_raw(value)
    return _build(raw, file=None, base_dir=Path(base_dir) if base_dir is not None else Path.cwd())


def _to_raw(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _to_raw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_raw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_EXPECTED = (
    'a size: bytes as an integer, or a string like "64MiB", "1GiB", "512KiB", "10MB" '
    "(units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)"
)


def parse_size(value: Any, *, key: str = "size", file: str | os.PathLike[str] | None = None) -> int:
    """Parse a byte size: an int, or a string like ``"64MiB"``, ``"10 mb"``, ``"4096"``.

    Units are case-insensitive; KB/MB/GB/TB are SI (1000), KiB/MiB/GiB/TiB are IEC (1024).
    A decimal number is allowed if the result is whole bytes (``"1.5KiB"`` = 1536).
    Raises ``ConfigError`` naming ``key`` and ``file``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"got {_describe(value)}; expected {_SIZE_EXPECTED}", key=key, file=file)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"got {value}; expected a size >= 0", key=key, file=file)
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ConfigError(f"cannot parse {value!r}; expected {_SIZE_EXPECTED}", key=key, file=file)
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ConfigError(
            f"unknown unit {unit!r} in {value!r}; expected {_SIZE_EXPECTED}", key=key, file=file
        )
    try:
        amount = Decimal(number) * multiplier
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ConfigError(f"cannot parse {value!r}", key=key, file=file) from exc
    if amount != amount.to_integral_value():
        raise ConfigError(
            f"{value!r} is not a whole number of bytes; expected {_SIZE_EXPECTED}",
            key=key,
            file=file,
        )
    return int(amount)


def _format_size(n: int) -> str:
    for unit, multiplier in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= multiplier and n % multiplier == 0:
            return f"{n // multiplier}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} ({value!r})"


class _Checker:
    """Typed access to the flattened raw values, raising ConfigError with file and key."""

    def __init__(self, flat: dict[str, Any], file: Path | None, base_dir: Path) -> None:
        self.flat = flat
        self.file = file
        self.base_dir = base_dir

    def error(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, key=key, file=self.file, hint=hint)

    def get(self, key: str) -> Any:
        return self.flat.get(key, _SPEC[key].default)

    def get_int(self, key: str, lo: int, hi: int | None = None) -> int:
        value = self.get(key)
        expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"got {_describe(value)}; expected {expected}")
        if value < lo or (hi is not None and value > hi):
            raise self.error(key, f"got {value}; expected {expected}")
        return value

    def optional_int(self, key: str, lo: int, hi: int) -> int | None:
        return None if self.get(key) is None else self.get_int(key, lo, hi)

    def get_bool(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"got {_describe(value)}; expected true or false")
        return value

    def positive_float(self, key: str, lo: float = 0.0) -> float:
        value = self.get(key)
        expected = f"a number of seconds >= {lo}" if lo else "a number of seconds > 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"got {_describe(value)}; expected {expected}")
        if not 0 < value < float("inf") or value < lo:
            raise self.error(key, f"got {value!r}; expected {expected}")
        return float(value)

    def get_str(self, key: str, expected: str = "a string") -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"got {_describe(value)}; expected {expected}")
        return value

    def _resolve(self, text: str) -> Path:
        return (self.base_dir / Path(text).expanduser()).resolve()

    def get_path(self, key: str) -> Path:
        where = "the config file's directory" if self.file else "the base directory"
        return self._resolve(self.get_str(key, f"a path (relative paths are relative to {where})"))

    def optional_path(self, key: str) -> Path | None:
        return None if self.get(key) is None else self.get_path(key)

    def get_paths(self, key: str) -> tuple[Path, ...]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"got {_describe(value)}; expected an array of path strings")
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(
                    f"{key}[{index}]", f"got {_describe(item)}; expected a path string"
                )
            out.append(self._resolve(item))
        return tuple(out)

    def get_size(self, key: str) -> int:
        size = parse_size(self.get(key), key=key, file=self.file)
        if size <= 0:
            raise self.error(key, f"got {size}; expected a size > 0")
        return -(-size // PAGE_SIZE) * PAGE_SIZE  # round up to whole pages

    def get_http(self, key: str) -> tuple[str, int] | None:
        value = self.get(key)
        if value is False or value == "off":
            return None
        if not isinstance(value, str):
            raise self.error(key, f'got {_describe(value)}; expected "HOST:PORT" or "off"')
        try:
            return parse_http(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def get_schema(self, key: str) -> str:
        value = self.get_str(key, 'a "package.module:attr" string')
        module, sep, attr = value.partition(":")
        if not (
            sep
            and all(part.isidentifier() for part in module.split("."))
            and all(part.isidentifier() for part in attr.split("."))
        ):
            raise self.error(
                key,
                f'got {value!r}; expected "package.module:attr" (a module import path, a '
                'colon, the name of the schema object), e.g. "myservice.schema:schema"',
            )
        return value

    def get_endpoint(
        self, key: str, template: str, run_dir: Path, port_key: str | None = None, **fields: int
    ) -> str:
        """Substitute ``{run_dir}``, ``{shard}``, ``{port}`` in ``template`` and check it."""
        try:
            endpoint = template.format(run_dir=str(run_dir), **fields)
        except KeyError as exc:
            name = exc.args[0]
            if name == "port" and port_key is not None:
                problem = f"uses {{port}} but {port_key} is not set; expected {port_key} = <port>"
            else:
                known = ", ".join("{" + k + "}" for k in ("run_dir", *fields))
                problem = f"has an unknown placeholder {{{name}}}; expected only {known}"
            raise self.error(key, f"{template!r} {problem}") from exc
        except (ValueError, IndexError) as exc:
            raise self.error(
                key,
                f"bad placeholder in {template!r} ({exc}); expected {{run_dir}}, {{shard}} or "
                "{port}, optionally with a format spec like {shard:02d}; write a literal brace "
                "as {{ or }}",
            ) from exc
        _check_endpoint(self, key, endpoint, run_dir)
        return endpoint

    def shard_endpoints(
        self, key: str, base_key: str, shards: int, run_dir: Path
    ) -> tuple[str, ...]:
        value = self.get(key)
        base_port = self.optional_int(base_key, 1, 65535)
        if isinstance(value, str) and value:
            templates = [(key, value)] * shards
        elif isinstance(value, list):
            if len(value) != shards:
                raise self.error(
                    key,
                    f"has {len(value)} endpoints; expected one per shard ({shards}), or one "
                    'pattern string with {shard} or {port}, e.g. "tcp://10.0.0.5:{port}"',
                )
            templates = []
            for index, item in enumerate(value):
                if not isinstance(item, str) or not item:
                    raise self.error(
                        f"{key}[{index}]", f"got {_describe(item)}; expected an endpoint string"
                    )
                templates.append((f"{key}[{index}]", item))
        else:
            raise self.error(
                key,
                f"got {_describe(value)}; expected an endpoint pattern string (placeholders "
                "{run_dir}, {shard}, {port}) or an array with one endpoint per shard",
            )
        out = []
        for n, (item_key, template) in enumerate(templates):
            fields = {"shard": n}
            if base_port is not None:
                if base_port + n > 65535:
                    raise self.error(
                        base_key, f"{base_port} + shard {n} is past port 65535; expected lower"
                    )
                fields["port"] = base_port + n
            out.append(self.get_endpoint(item_key, template, run_dir, base_key, **fields))
        return tuple(out)


def derive_reader_endpoint(base: str, index: int) -> str:
    """Reader ``index``'s endpoint in a pool whose ``readers.endpoint`` is ``base``: ``base``
    for reader 0, then the port plus ``index`` (tcp) or ``-<index>`` before the file suffix
    (ipc): ``ipc:///run/readers.sock`` -> ``ipc:///run/readers-1.sock``."""
    if index == 0:
        return base
    if base.startswith("tcp://"):
        host, port = _split_host_port(base[len("tcp://"):])
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{int(port) + index}"
    path = PurePosixPath(base[len("ipc://"):])
    return f"ipc://{path.with_name(f'{path.stem}-{index}{path.suffix}')}"


def check_reader_endpoints(config: Config) -> None:
    """ConfigError (key ``readers.endpoint``) for a derived reader endpoint that passes port
    65535 or the unix socket path limit, or that another configured endpoint also uses."""
    taken = {ep: key for key, ep in config.all_endpoints() if key != "readers.endpoint"}
    spread = (f"reader I listens on readers.endpoint's port plus I (tcp) or on <name>-I.<suffix> "
              f"(ipc), for I < readers.count ({config.readers})")
    for i, ep in enumerate(config.reader_endpoints()):
        what = f"reader {i}'s endpoint {ep}"
        if ep.startswith("tcp://"):
            if int(_split_host_port(ep[len("tcp://"):])[1]) > 65535:
                raise ConfigError(
                    f"{what} is past port 65535; expected readers.endpoint's port plus "
                    f"{config.readers - 1} to be at most 65535",
                    key="readers.endpoint", file=config.path, hint=f"{spread}: lower the port")
        elif (length := len(os.fsencode(ep[len("ipc://"):]))) > IPC_PATH_MAX:
            raise ConfigError(
                f"{what} is {length} bytes, longer than the unix socket limit; expected at "
                f"most {IPC_PATH_MAX} bytes",
                key="readers.endpoint", file=config.path, hint="use a shorter run_dir")
        if ep in taken:
            raise ConfigError(
                f"{what} is also used by {taken[ep]}; expected every endpoint to be distinct",
                key="readers.endpoint", file=config.path,
                hint=f"{spread}: leave those free, e.g. give readers.endpoint a port range of "
                "its own",
            )


def _split_host_port(address: str) -> tuple[str, str]:
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
        return host, port
    host, sep, port = address.rpartition(":")
    return (host, port) if sep else (address, "")


def parse_http(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> (host, port); port 0 picks a free one.
    ValueError naming what was expected if malformed."""
    host, port = _split_host_port(text)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"got {text!r}; expected HOST:PORT, e.g. {DEFAULT_MONITOR_HTTP!r}, "
                         'or "off"')
    return host, int(port)


def format_http(address: tuple[str, int] | None) -> str:
    """The inverse of ``parse_http`` (``"off"`` for None)."""
    if address is None:
        return "off"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _check_endpoint(chk: _Checker, key: str, endpoint: str, run_dir: Path) -> None:
    expected = 'expected "ipc:///absolute/path.sock" or "tcp://host:port"'
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path.startswith("/"):
            raise chk.error(
                key,
                f"{endpoint!r} has a relative ipc path; {expected}",
                hint='start the path with {run_dir}, e.g. "ipc://{run_dir}/name.sock"',
            )
        length = len(os.fsencode(path))
        if length > IPC_PATH_MAX:
            raise chk.error(
                key,
                f"ipc path {path!r} is {length} bytes, longer than the unix socket limit; "
                f"expected at most {IPC_PATH_MAX} bytes",
                hint=f"use a shorter run_dir (now {run_dir}), e.g. /run/lmshard or /tmp/lmshard",
            )
    elif endpoint.startswith("tcp://"):
        host, port = _split_host_port(endpoint[len("tcp://") :])
        if host in ("*", "", "0.0.0.0", "::", "[::]") or host.startswith("*"):
            raise chk.error(
                key,
                f"{endpoint!r} has no concrete host; {expected} (clients connect to the same "
                "endpoint the server binds, so name the address, e.g. tcp://10.0.0.5:5500)",
            )
        valid_host = _HOSTNAME_RE.fullmatch(host) is not None
        if not valid_host:
            try:
                ipaddress.ip_address(host)
                valid_host = True
            except ValueError:
                valid_host = False
        if not valid_host:
            raise chk.error(key, f"{endpoint!r} has an invalid host {host!r}; {expected}")
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise chk.error(
                key, f"{endpoint!r} has port {port!r}; expected a port number from 1 to 65535"
            )
    else:
        raise chk.error(key, f"got {endpoint!r}; {expected} (only ipc and tcp are supported)")


def _flatten(chk: _Checker, table: Mapping[str, Any], prefix: str = "") -> None:
    for name, value in table.items():
        key = prefix + name
        if key in _TABLES:
            if not isinstance(value, dict):
                close = difflib.get_close_matches(key, list(_SPEC), n=1)
                also = f"; or did you mean {close[0]!r}?" if close else ""
                raise chk.error(key, f"got {_describe(value)}; expected a table ([{key}]){also}")
            _flatten(chk, value, key + ".")
        elif key in _SPEC:
            if isinstance(value, dict):
                close = difflib.get_close_matches(key, list(_TABLES), n=1)
                if close:
                    raise chk.error(
                        key, f"got a table; {key!r} is not a table, did you mean [{close[0]}]?"
                    )
            chk.flat[key] = value
        else:
            raise _unknown_key(chk, key, prefix, value)


def _closest(key: str, candidates: list[str], cutoff: float = 0.6) -> list[str]:
    """The candidate most like ``key`` (difflib's ratio, at least ``cutoff``), as a list of at
    most one; on a tie, the one in the same table as ``key``, then the first in sorted order."""
    table = key.rpartition(".")[0]
    best: tuple[float, bool] | None = None
    found: list[str] = []
    for cand in sorted(candidates):
        m = difflib.SequenceMatcher(None, cand, key)
        if m.real_quick_ratio() < cutoff or m.quick_ratio() < cutoff:
            continue
        score = (m.ratio(), cand.rpartition(".")[0] == table)
        if score[0] >= cutoff and (best is None or score > best):
            best, found = score, [cand]
    return found


def _unknown_key(chk: _Checker, key: str, prefix: str, value: Any) -> ConfigError:
    # Suggest the kind of thing the file wrote: a table for a table (``[shardd]`` -> shard), a
    # key for a value (``shardz = 4`` -> shards); the other kind only when nothing fits.
    tables, keys = sorted(_TABLES), sorted(_SPEC)
    fitting, other = (tables, keys) if isinstance(value, dict) else (keys, tables)
    suggestion = _closest(key, fitting) or _closest(key, other)
    leaf = key.rpartition(".")[2]
    if not suggestion:
        suggestion = [k for k in fitting + other if k.rpartition(".")[2] == leaf][:1]
    table = prefix[:-1]
    siblings = [k.rpartition(".")[2] for k in _SPEC if k.rpartition(".")[0] == table]
    if not table:
        siblings += sorted(_TABLES)
    message = f"unknown key {key!r}"
    if suggestion:
        message += f"; did you mean {suggestion[0]!r}?"
    where = f"[{table}]" if table else "the top level"
    message += f" (known keys in {where}: {', '.join(siblings)})"
    return chk.error(key, message)


def _build(raw: Mapping[str, Any], *, file: Path | None, base_dir: Path) -> Config:
    chk = _Checker({}, file, base_dir)
    _flatten(chk, raw)

    shards = chk.get_int("shards", 1, MAX_SHARDS)
    slots = chk.get_int("slots", 1, MAX_SLOTS)
    if slots < shards:
        raise chk.error(
            "slots", f"got {slots}, fewer than shards ({shards}); expected slots >= shards"
        )
    runs = chk.get("slot_map.runs")
    if runs is None:
        slot_map = SlotMap(shards, slots)
    else:
        if not isinstance(runs, list):
            raise chk.error(
                "slot_map.runs", f"got {_describe(runs)}; expected an array of [start, end, shard]"
            )
        try:
            slot_map = SlotMap.from_runs(shards, slots, runs)
        except ValueError as exc:
            raise chk.error(
                "slot_map.runs",
                f"{str(exc).removeprefix('slot map: ')}; expected sorted, contiguous runs "
                f"[start, end (exclusive), shard] covering slots 0 to {slots - 1} and giving "
                f"each of the {shards} shards at least one slot",
            ) from exc

    data_dir = chk.get_path("data_dir")
    run_dir = chk.get_path("run_dir")

    map_size = chk.get_size("storage.map_size")
    max_map_size = chk.get_size("storage.max_map_size")
    if map_size > max_map_size:
        raise chk.error(
            "storage.map_size",
            f"{map_size} bytes is larger than storage.max_map_size ({max_map_size} bytes); "
            "expected map_size <= max_map_size",
        )

    curve = None
    if any(key.startswith("curve.") for key in chk.flat) or "curve" in raw:
        curve = CurveConfig(
            server_secret_key=chk.optional_path("curve.server_secret_key"),
            server_public_key=chk.optional_path("curve.server_public_key"),
            client_secret_key=chk.optional_path("curve.client_secret_key"),
            allowed_client_keys=chk.optional_path("curve.allowed_client_keys"),
        )

    config = Config(
        path=file,
        data_dir=data_dir,
        run_dir=run_dir,
        shards=shards,
        slots=slots,
        slot_map=slot_map,
        map_size=map_size,
        max_map_size=max_map_size,
        sync=chk.get_bool("durability.sync"),
        metasync=chk.get_bool("durability.metasync"),
        max_readers=_max_readers(chk),
        schema=chk.get_schema("schema"),
        python_path=chk.get_paths("python_path"),
        readers=chk.get_int("readers.count", 0, 256),
        reader_endpoint=chk.get_endpoint(
            "readers.endpoint", chk.get_str("readers.endpoint", "an endpoint string"), run_dir
        ),
        monitor_endpoint=chk.get_endpoint(
            "monitor.endpoint", chk.get_str("monitor.endpoint", "an endpoint string"), run_dir
        ),
        stats_interval=chk.positive_float("monitor.stats_interval", MIN_STATS_INTERVAL),
        monitor_http=chk.get_http("monitor.http"),
        timeout_ms=chk.get_int("client.timeout_ms", 1, MAX_TIMEOUT_MS),
        retries=chk.get_int("client.retries", 0, 1000),
        local_reads=chk.get_bool("client.local_reads"),
        endpoints=chk.shard_endpoints("shard.endpoint", "shard.base_port", shards, run_dir),
        stat_endpoints=chk.shard_endpoints(
            "shard.stat_endpoint", "shard.stat_base_port", shards, run_dir
        ),
        backup_endpoints=chk.shard_endpoints(
            "shard.backup_endpoint", "shard.backup_base_port", shards, run_dir
        ),
        curve=curve,
    )

    seen: dict[str, str] = {}
    for key, endpoint in config.all_endpoints():
        if endpoint in seen:
            raise chk.error(
                key,
                f"{endpoint!r} is also used by {seen[endpoint]}; expected every endpoint to be "
                "distinct (use {shard} or {port} in patterns)",
            )
        seen[endpoint] = key
    check_reader_endpoints(config)
    return config


def _max_readers(chk: _Checker) -> int:
    key = "storage.max_readers"
    slots = chk.get(key)
    if type(slots) is int and slots > MAX_READER_SLOTS:
        raise chk.error(
            key,
            f"got {slots:,}; expected an integer from 1 to {MAX_READER_SLOTS} (every slot is "
            f"{READER_SLOT_SIZE} bytes of each shard's lock file: "
            f"{slots * READER_SLOT_SIZE / 2**20:,.0f} MiB here)",
            hint="one slot per read transaction open at once on this host (reading processes "
            "x threads, plus the reader pool) is enough; the default is "
            f"{_SPEC[key].default}",
        )
    return chk.get_int(key, 1, MAX_READER_SLOTS)


# --------------------------------------------------------------------------------------------
# A small TOML writer for the types a config uses
# --------------------------------------------------------------------------------------------


class _Raw(str):
    """Already-rendered TOML."""


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _toml_value(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        items = [_toml_value(v) for v in value]
        flat = "[" + ", ".join(items) + "]"
        if len(flat) > 72 or any(isinstance(v, (list, tuple)) for v in value):
            return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
        return flat
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
