"""The validated config: ``Config``, whose every field declares the key it is read from.

Each field is one declaration: its attribute and type, its dotted key, the kind of value with
its limits, its default as written in TOML, and its doc. Reading (``build_config``,
``make_config``), error messages, ``Config.to_toml`` and config/lmshard.toml all come from it;
adding a key means adding a field here (plus the code that uses it).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshard.config.dotted import KeyNames
from lmshard.config.endpoints import (
    DEFAULT_MONITOR_HTTP,
    IPC_PATH_MAX,
    derive_reader_endpoint,
    is_loopback,
    split_host_port,
)
from lmshard.config.errors import ConfigError
from lmshard.config.kinds import (
    REPLICA_ROLES,
    Boolean,
    Endpoint,
    HttpAddress,
    Integer,
    LocalPath,
    LocalPaths,
    MapVersion,
    ReplicaEndpoint,
    ReplicaLocal,
    ReplicaNames,
    SchemaRef,
    Seconds,
    ShardEndpoints,
    Size,
    SlotRuns,
    replica_endpoint,
)
from lmshard.config.schema_import import import_schema
from lmshard.config.settings import (
    Reader,
    Setting,
    WriteContext,
    setting,
    setting_of,
    settings_of,
    table_class,
    table_of,
    to_toml_types,
)
from lmshard.members import HOME, Member
from lmshard.routing import DEFAULT_SLOTS, SlotMap

MAX_SHARDS = 256
"""Most shards a config may have."""
MAX_SLOTS = 65536
"""Upper bound for ``slots``: keeps slot maps small (one entry per slot) and digests cheap."""
MIN_STATS_INTERVAL = 0.01
"""Shortest stats interval, in seconds: shorter would make the owners spin publishing."""
MIN_FLUSH_INTERVAL = 0.001
"""Shortest flush interval, in seconds (0 turns flushing by interval off)."""
MAX_TIMEOUT_MS = 3_600_000
"""Longest client timeout: one hour (ZeroMQ timeouts are C ints of milliseconds)."""
DEFAULT_READER_SLOTS = 126
"""LMDB's own default number of reader slots."""
MAX_READER_SLOTS = 65536
"""Most LMDB reader slots per shard: each is 64 bytes of every shard's lock file (4 MiB here),
far more than the read transactions one host keeps open at once."""
READER_SLOT_SIZE = 64
"""Bytes of a shard's lock file per reader slot (LMDB's MDB_reader, one cache line)."""

DEFAULT_SHARD_ENDPOINT = "ipc://{run_dir}/shard-{shard:02d}.sock"
DEFAULT_STAT_ENDPOINT = "ipc://{run_dir}/stat-{shard:02d}.sock"
DEFAULT_BACKUP_ENDPOINT = "ipc://{run_dir}/backup-{shard:02d}.sock"
DEFAULT_CHANGES_ENDPOINT = "ipc://{run_dir}/changes-{shard:02d}.sock"
DEFAULT_REPLICA_ENDPOINT = "ipc://{run_dir}/replica-{replica}-{role}-{shard:02d}.sock"
DEFAULT_READER_ENDPOINT = "ipc://{run_dir}/readers.sock"
DEFAULT_MONITOR_ENDPOINT = "ipc://{run_dir}/monitor.sock"
SUPERVISOR_SOCKET = "supervisor.sock"
"""supervisord's unix socket (supervisorctl, XML-RPC), in the run directory."""
SUPERVISOR_GROUP = "lmshard"
"""The supervisord group of every lmshard program (shard owner N is ``lmshard:shard_NN``)."""


def owner_program(shard: int) -> str:
    """The supervisord name of shard ``shard``'s owner, e.g. ``lmshard:shard_01``."""
    return f"{SUPERVISOR_GROUP}:shard_{shard:02d}"


WRITTEN_HEADER = ("lmshard configuration (written by lmshard; see config/lmshard.toml for every "
                  "key).\nRelative paths are relative to the directory this file is in.")
"""The comment at the top of a file ``Config.to_toml`` writes."""

_ENDPOINTS_DOC = (
    "Endpoints, one per shard: either one pattern string or an array with one endpoint per "
    "shard. Only ipc:// (absolute path) and tcp://host:port are accepted. Placeholders: "
    "{run_dir}; {shard} (the shard number, with a format spec: {shard:02d} -> 00, 01, ...); "
    "{port}, which is the matching *base_port key plus the shard number (see "
    "config/example-multihost.toml). Write a literal brace as {{ or }}. Every endpoint must be "
    "distinct.\n\n"
)
_CURVE_DOC = (
    "CURVE keys (ZeroMQ encryption and authentication; `lmshard keys new` makes them): tcp "
    "endpoints on a non-loopback address must use them. Relative paths are resolved; the files "
    "are read by the processes that use them, not when the config loads.\n\n"
)


def _reader_slots_cost(slots: int) -> tuple[str, str]:
    return (f"every slot is {READER_SLOT_SIZE} bytes of each shard's lock file: "
            f"{slots * READER_SLOT_SIZE / 2**20:,.0f} MiB here",
            "one slot per read transaction open at once on this host (reading processes x "
            f"threads, plus the reader pool) is enough; the default is {DEFAULT_READER_SLOTS}")


@dataclass(frozen=True)
class CurveConfig:
    """CURVE key locations (``[curve]``), used by the security feature; paths are not checked
    for existence here. Certificates are ``zmq.auth`` certificate files."""

    server_secret_key: Path | None = setting(
        "curve.server_secret_key", LocalPath(optional=True), None,
        _CURVE_DOC + "The servers' secret certificate (owners, readers, monitor); keep it mode "
        "0600.", example='"/etc/lmshard/keys/server.key_secret"')
    server_public_key: Path | None = setting(
        "curve.server_public_key", LocalPath(optional=True), None,
        "The servers' public certificate, so clients can verify the servers.",
        example='"/etc/lmshard/keys/server.key"')
    client_secret_key: Path | None = setting(
        "curve.client_secret_key", LocalPath(optional=True), None,
        "This client's secret certificate.", example='"/etc/lmshard/keys/client.key_secret"')
    allowed_client_keys: Path | None = setting(
        "curve.allowed_client_keys", LocalPath(optional=True), None,
        "Directory of the public certificates of the clients allowed to connect.",
        example='"/etc/lmshard/keys/clients"')


@dataclass(frozen=True)
class Config:
    """A validated config. Build with ``load_config`` (file) or ``make_config`` (no file)."""

    path: Path | None
    """The file it was read from; None for ``make_config``."""
    shards: int = setting(
        "shards", Integer(1, MAX_SHARDS), 4,
        f"Number of shards (LMDB environments, one owner process each), 1 to {MAX_SHARDS}. "
        "Changed on a running service by `lmshard reshard --shards M`, which moves slots "
        "between shards and updates this file.")
    slots: int = setting(
        "slots", Integer(1, MAX_SLOTS, at_least="shards"), DEFAULT_SLOTS,
        "Hash slots keys are spread over (a key's partition bytes -> crc32 -> slot -> shard), "
        f"from `shards` to {MAX_SLOTS}. Fixed once data exists. Slots are split evenly into "
        "contiguous ranges unless slot_map.runs says otherwise.")
    data_dir: Path = setting(
        "data_dir", LocalPath(), "var/data",
        "Directory with one LMDB environment per shard: <data_dir>/shard-00, shard-01, ...")
    run_dir: Path = setting(
        "run_dir", LocalPath(), "var/run",
        "Directory for ipc sockets and pid files; created with mode 0700. Keep it short: a unix "
        "socket path may be at most 107 bytes (103 on macOS).")
    schema: str = setting(
        "schema", SchemaRef(), "lmshard.demo:schema",
        "The schema (tables, key types, codecs, indexes) every process loads, as "
        '"package.module:attr": import package.module, take its attribute attr.')
    python_path: tuple[Path, ...] = setting(
        "python_path", LocalPaths(), [],
        "Directories every lmshard process (owners, readers, monitor, CLI) prepends to sys.path "
        'before importing the schema module, e.g. ["../src"] for a service not installed into '
        "the venv.")
    map_size: int = setting(
        "storage.map_size", Size(at_most="storage.max_map_size"), "64MiB",
        "Initial LMDB map size per shard. Rounded up to a multiple of the OS page size (4096 "
        "bytes on most systems).")
    max_map_size: int = setting(
        "storage.max_map_size", Size(), "8GiB",
        "When a write hits the map size, the owner grows the map (between transactions) up to "
        "this cap, then answers StoreFull. Also rounded up to whole pages; must be >= map_size.")
    max_readers: int = setting(
        "storage.max_readers",
        Integer(1, MAX_READER_SLOTS, above=_reader_slots_cost), DEFAULT_READER_SLOTS,
        "LMDB reader slots per shard: concurrent read transactions across all processes on the "
        "host.")
    sync: bool = setting(
        "durability.sync", Boolean(), True,
        "fsync the data on every commit (or every flush_interval). false: never fsync, the OS "
        "writes back when it likes; an OS crash or power loss may lose the commits it had not "
        "written, and on a filesystem that does not keep the order of writes may damage the "
        "store (LMDB's MDB_NOSYNC). A crash of the owner alone loses nothing in any mode. An "
        "ack always means \"committed under these settings\" (docs/operations.md, "
        "Durability).")
    metasync: bool = setting(
        "durability.metasync", Boolean(), True,
        "fsync the meta page on every commit. false: an OS crash may undo the last commit (the "
        "store stays consistent). Only matters when sync is true and flush_interval is 0.")
    flush_interval: float = setting(
        "durability.flush_interval", Seconds(MIN_FLUSH_INTERVAL, off=True), 0,
        "Seconds between flushes to disk instead of an fsync per commit (Redis's appendfsync "
        "everysec is 1); 0: off, every commit is fsynced. > 0: a commit is acked once written "
        "to the OS, so a crash of the owner loses nothing, and the owner flushes when the last "
        "flush is this old (on a clean stop too); an OS crash or power loss may lose the "
        "commits of the last interval (a little more when the owner is idle, up to 0.1 s), "
        "and on a filesystem that does not keep the order of writes may damage the store "
        "(LMDB's MDB_NOSYNC). Needs sync and metasync true.")
    replicas_required: int = setting(
        "durability.replicas", Integer(0, 16), 0,
        "Replicas (replica.names) that must have a commit durably before its owner acks it. "
        "0: the owner acks on its own commit. k >= 1: losing the owner's host loses no acked "
        "write; while fewer than k replicas follow, writes wait up to replica_timeout and then "
        "fail with ReplicaTimeout (committed on the owner, not yet safe elsewhere).")
    replica_timeout: float = setting(
        "durability.replica_timeout", Seconds(0.01), 5.0,
        "Seconds an owner waits for durability.replicas replicas to confirm a commit before it "
        "answers ReplicaTimeout.")
    readers: int = setting(
        "readers.count", Integer(0, 256), 2,
        "Reader pool size: processes serving get/multi-get/scan/index reads for other hosts (and "
        "for clients that do not read locally). 0 runs no reader pool.")
    reader_endpoint: str = setting(
        "readers.endpoint", Endpoint(), DEFAULT_READER_ENDPOINT,
        "The reader pool's request endpoint; reader I listens on its port plus I (tcp) or on "
        "<name>-I.<suffix> (ipc). Placeholders: {run_dir}.")
    monitor_endpoint: str = setting(
        "monitor.endpoint", Endpoint(), DEFAULT_MONITOR_ENDPOINT,
        "The monitor's endpoint (aggregated stats; `lmshard top`). Placeholders: {run_dir}.")
    stats_interval: float = setting(
        "monitor.stats_interval", Seconds(MIN_STATS_INTERVAL), 1.0,
        "Seconds between the stat.<shard> messages each owner publishes.")
    monitor_http: tuple[str, int] | None = setting(
        "monitor.http", HttpAddress(), DEFAULT_MONITOR_HTTP,
        'Where the monitor serves Prometheus /metrics and /stats (JSON), as "HOST:PORT", or '
        '"off". Give each service on a host its own port; `lmshard up` refuses a port another '
        "process holds. Port 0 picks a free one (shown by `lmshard status` and in /stats).")
    timeout_ms: int = setting(
        "client.timeout_ms", Integer(1, MAX_TIMEOUT_MS, unit="milliseconds"), 2000,
        "Milliseconds a client waits for a shard owner's ack before retrying the batch. Retries "
        "are safe: batches carry (client id, sequence) and are applied once.")
    retries: int = setting(
        "client.retries", Integer(0, 1000), 3,
        "Retries after a timeout before the client raises.")
    local_reads: bool = setting(
        "client.local_reads", Boolean(), True,
        "Read shards in-process through LMDB (zero-copy; same host only). false: read through "
        "the reader pool.")
    breaker_ms: int = setting(
        "client.breaker_ms", Integer(0, MAX_TIMEOUT_MS, unit="milliseconds"), 1000,
        "After a shard owner failed to answer a request (every retry), calls to that shard "
        "fail at once with ShardUnavailable for this many milliseconds (a circuit breaker), "
        "then one call goes through as a probe; calls to other shards are not held up. 0: off.")
    replica_wait: float = setting(
        "client.replica_wait", Seconds(0.0), 1.0,
        "On a host that reads a replica (replica.local), how long a read waits for the replica "
        "to have this client's own last write before it raises ReplicaBehind.")
    endpoints: tuple[str, ...] = setting(
        "shard.endpoint", ShardEndpoints("shard.base_port"), DEFAULT_SHARD_ENDPOINT,
        _ENDPOINTS_DOC + "Write endpoint of each shard owner (clients' DEALERs connect to it).")
    unix_socket: bool = setting(
        "shard.unix_socket", Boolean(), True,
        "For an ipc shard.endpoint: the owner also listens on a plain unix stream socket (the "
        "endpoint's path + \".u\"), and clients on its host send their requests to one shard "
        "(single puts, batches to one shard, reads by the owner; the async client's many in "
        "flight too) there, skipping ZeroMQ's I/O threads; requests over 256 KiB, to several "
        "shards at once, and the pipelined writer still go through ZeroMQ. false: ZeroMQ only "
        "(an owner without it is simply not reached this way).")
    stat_endpoints: tuple[str, ...] = setting(
        "shard.stat_endpoint", ShardEndpoints("shard.stat_base_port"), DEFAULT_STAT_ENDPOINT,
        "Stats PUB endpoint of each shard owner (topic stat.<shard>).")
    backup_endpoints: tuple[str, ...] = setting(
        "shard.backup_endpoint", ShardEndpoints("shard.backup_base_port"),
        DEFAULT_BACKUP_ENDPOINT, "Backup endpoint of each shard owner (snapshot streaming).")
    changes_endpoints: tuple[str, ...] = setting(
        "shard.changes_endpoint", ShardEndpoints("shard.changes_base_port"),
        DEFAULT_CHANGES_ENDPOINT,
        "Change-feed endpoint of each shard owner (`client.watch()`, `lmshard watch`).")
    changes_enabled: bool = setting(
        "changes.enabled", Boolean(), True,
        "Keep a change log per shard: every committed change, in commit order, written in the "
        "same transaction as the change, served to watchers (`client.watch()`). false: no log "
        "(switching it back on starts a new log; cursors of the old one are compacted).")
    changes_retain: int = setting(
        "changes.retain", Size(), "64MiB",
        "Keep each shard's log up to this size; older records are trimmed a few at a time "
        "as commits go. A watcher further behind gets ChangesCompacted.")
    changes_retain_seconds: float = setting(
        "changes.retain_seconds", Seconds(1.0), 86400,
        "Keep each shard's log records at most this many seconds (and within retain).")
    replica_names: tuple[str, ...] = setting(
        "replica.names", ReplicaNames(), [],
        "Replicas: full copies of every shard, kept on other hosts by `lmshardd replica` "
        "processes that follow each owner's change log. Each name is one copy of every shard "
        "(one host); a host name or address works, which replica.endpoint can then use as "
        "{replica}. Empty: no replicas.", example='["10.0.0.6"]')
    replica_local: str = setting(
        "replica.local", ReplicaLocal(), "",
        "Which copy this host holds: \"\" for the shards' own (data_dir and the shard.* "
        "endpoints), or one of replica.names. Processes here read that copy in-process; "
        "`lmshard up` here runs that copy's processes.")
    replica_data_dir: Path = setting(
        "replica.data_dir", LocalPath(), "var/replicas",
        "Where a replica host keeps its copies: <replica.data_dir>/<name>/shard-00, ...")
    replica_endpoint: str = setting(
        "replica.endpoint", ReplicaEndpoint(), DEFAULT_REPLICA_ENDPOINT,
        "The endpoints of each replica's copy of each shard (it answers there, and serves the "
        "shard there once promoted). Placeholders: {replica} (its name), {role} (write, stat, "
        "backup, changes), {shard}, {run_dir}, and {port}: replica.base_port + 4 x shard + "
        "the role's place in that list. Across hosts: \"tcp://{replica}:{port}\" with CURVE.")
    slot_map: SlotMap = setting(
        "slot_map.runs", SlotRuns(), None,
        "Optional explicit slot map: runs [first slot, end slot (exclusive), shard] that are "
        "sorted, contiguous, cover every slot and give every shard at least one slot (a map "
        "`lmshard reshard` wrote, version > 0, may leave a shard it adds or empties without). "
        "Left out: "
        "the even contiguous split, which for 4 shards x 1024 slots is the one shown here.",
        example="[[0, 256, 0], [256, 512, 1], [512, 768, 2], [768, 1024, 3]]")
    slot_map_version: int = setting(
        "slot_map.version", MapVersion(), 0,
        "Version of slot_map.runs: `lmshard reshard` records each move as a new version in "
        "every shard and writes the last one here when it is done. A shard that records a "
        "later version serves by its own map (a re-shard is under way); one that records an "
        "earlier version is refused.", example="0")
    curve: CurveConfig | None = table_of(CurveConfig)
    """The ``[curve]`` table; None when the file has none."""
    replica_base_port: int | None = setting(
        "replica.base_port", Integer(1, 65535, optional=True), None,
        "{port} in replica.endpoint is replica.base_port + 4 x shard + the role's place "
        "(write 0, stat 1, backup 2, changes 3).", example="6100")

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

    def changes_endpoint(self, n: int) -> str:
        """Shard ``n`` owner's change-feed endpoint."""
        return self.changes_endpoints[self._check_shard(n)]

    def all_endpoints(self) -> list[tuple[str, str]]:
        """Every endpoint as ``(dotted key, endpoint)``, e.g. ``("shard.endpoint[0]", ...)``."""
        out: list[tuple[str, str]] = []
        for key, eps in (
            ("shard.endpoint", self.endpoints),
            ("shard.stat_endpoint", self.stat_endpoints),
            ("shard.backup_endpoint", self.backup_endpoints),
            ("shard.changes_endpoint", self.changes_endpoints),
        ):
            out.extend((f"{key}[{n}]", ep) for n, ep in enumerate(eps))
        out.append(("readers.endpoint", self.reader_endpoint))
        out.append(("monitor.endpoint", self.monitor_endpoint))
        for name in self.replica_names:
            for n in range(self.shards):
                m = self.member(n, name)
                out.extend((f"replica.endpoint[{name}, {n}, {role}]", ep)
                           for role, ep in zip(REPLICA_ROLES, m.endpoints(), strict=True))
        return out

    # -- copies of a shard: its home and its replicas ---------------------------------------------

    def member(self, n: int, name: str = HOME) -> Member:
        """Copy ``name`` of shard ``n``: ``HOME`` (the shard's own: ``shard_dir`` and the
        ``shard.*`` endpoints) or one of ``replica_names``."""
        self._check_shard(n)
        if name in (HOME, ""):
            return Member(HOME, n, self.shard_dir(n), self.endpoint(n), self.stat_endpoint(n),
                          self.backup_endpoint(n), self.changes_endpoint(n))
        if name not in self.replica_names:
            raise ValueError(f"{name!r} is not a replica: replica.names is "
                             f"{list(self.replica_names)}")
        eps = [replica_endpoint(self.replica_endpoint, name, n, role, self.run_dir,
                                self.replica_base_port, file=self.path)
               for role in REPLICA_ROLES]
        return Member(name, n, self.replica_data_dir / name / f"shard-{n:02d}", *eps)

    def members(self, n: int) -> list[Member]:
        """Every copy of shard ``n``: its home first, then each replica in config order."""
        return [self.member(n, name) for name in (HOME, *self.replica_names)]

    @property
    def local_member(self) -> str:
        """The copy this host holds (``replica.local``; ``HOME`` when it is the shards' own)."""
        return self.replica_local or HOME

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
                host, _port = split_host_port(ep[len("tcp://"):])
                if not is_loopback(host):
                    out.append((key, ep))
        return out

    # -- schema and writing -------------------------------------------------------------------

    def load_schema(self) -> Any:
        """Import and return the schema object named by ``schema`` ("package.module:attr").

        Prepends ``python_path`` to ``sys.path`` (each directory once per process) first.
        Raises ``ConfigError`` naming the module, the attribute and the config file.
        """
        return import_schema(self.schema, self.python_path, self.path)

    def to_toml(self, relative_to: str | os.PathLike[str] | None = None) -> str:
        """Render this config as TOML that ``load_config`` reads back to an equal config, each
        key under its doc comment.

        Paths are written absolute, or relative to ``relative_to`` (pass the directory the file
        will be written to). Endpoints that follow the default patterns are written as patterns.
        """
        # Only tools that write a config file need the writer (and tomli_w): not imported with
        # lmshard.
        from lmshard.config.writing import render_toml

        base = Path(relative_to).resolve() if relative_to is not None else None
        return render_toml(self, WriteContext(base, self.run_dir), header=WRITTEN_HEADER)


PORT_SETTINGS = (
    Setting("shard.base_port", Integer(1, 65535, optional=True), None,
            "{port} in shard.endpoint is base_port + the shard number.",
            name="base_port", example="5500"),
    Setting("shard.stat_base_port", Integer(1, 65535, optional=True), None,
            "{port} in shard.stat_endpoint is stat_base_port + the shard number.",
            name="stat_base_port", example="5600"),
    Setting("shard.backup_base_port", Integer(1, 65535, optional=True), None,
            "{port} in shard.backup_endpoint is backup_base_port + the shard number.",
            name="backup_base_port", example="5700"),
    Setting("shard.changes_base_port", Integer(1, 65535, optional=True), None,
            "{port} in shard.changes_endpoint is changes_base_port + the shard number.",
            name="changes_base_port", example="6000"),
)
"""Keys no ``Config`` field holds: they only fill in ``{port}`` in the shard endpoints."""

SETTINGS: dict[str, Setting] = {s.key: s for s in [*settings_of(Config), *PORT_SETTINGS]}
"""Every key of the config file, by dotted key, in declaration order."""
KEYS = KeyNames(SETTINGS)
FIELD_KEYS: dict[str, str] = {
    **{s.name: s.key for f in dataclasses.fields(Config) if (s := setting_of(f)) is not None},
    **{s.name: s.key for s in PORT_SETTINGS},
}
"""``make_config`` keyword (``Config`` field, or ``base_port`` and friends) -> dotted key."""
TABLE_FIELDS: dict[str, type] = {
    f.name: cls for f in dataclasses.fields(Config) if (cls := table_class(f)) is not None
}
"""``Config`` fields that hold a whole table (``curve``) -> the dataclass of that table."""


def build_config(raw: Mapping[str, Any], *, file: Path | None, base_dir: Path) -> Config:
    """Read and check ``raw`` (parsed TOML); relative paths are relative to ``base_dir``."""
    flat, tables = KEYS.flatten(raw, file=file)
    reader = Reader(SETTINGS, flat, tables, file=file, base_dir=base_dir)
    config = Config(path=file, **reader.values_of(Config))
    seen: dict[str, str] = {}
    for key, endpoint in config.all_endpoints():
        if endpoint in seen:
            raise reader.error(key, f"{endpoint!r} is also used by {seen[endpoint]}; expected "
                                    "every endpoint to be distinct (use {shard} or {port} in "
                                    "patterns)")
        seen[endpoint] = key
    check_reader_endpoints(config)
    if config.replicas_required > len(config.replica_names):
        raise reader.error("durability.replicas", f"got {config.replicas_required}, but "
                           f"replica.names lists {len(config.replica_names)} replicas; expected "
                           "at most as many as there are replicas")
    check_durability(config)
    return config


def make_config(*, base_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Build a config without a file: the built-in defaults plus ``overrides``, validated.

    Keywords are ``Config`` field names (``shards=2, data_dir=tmp_path / "data", sync=False``),
    plus ``base_port``/``stat_base_port``/``backup_base_port``. ``endpoints`` and friends take a
    pattern string or a sequence; ``slot_map`` a ``SlotMap`` (its shard and slot counts are used
    unless given) or runs; ``curve`` a ``CurveConfig`` or dict. Relative paths are relative to
    ``base_dir`` (default: the current directory). Invalid values raise ``ConfigError``.
    """
    slot_map = overrides.get("slot_map")
    if isinstance(slot_map, SlotMap):
        overrides.setdefault("shards", slot_map.shards)
        overrides.setdefault("slots", slot_map.slots)
    raw: dict[str, Any] = {}
    for name, value in overrides.items():
        key = _keyword_key(name)
        if value is None:
            continue
        if key in TABLE_FIELDS:
            raw[key] = to_toml_types(value)
            continue
        table, _, leaf = key.rpartition(".")
        target = raw.setdefault(table, {}) if table else raw
        target[leaf] = SETTINGS[key].kind.from_keyword(value)
    return build_config(raw, file=None,
                        base_dir=Path(base_dir) if base_dir is not None else Path.cwd())


def _keyword_key(name: str) -> str:
    """The dotted key (or table) a ``make_config`` keyword sets; ConfigError if there is none."""
    if name in TABLE_FIELDS:
        return name
    if name in FIELD_KEYS:
        return FIELD_KEYS[name]
    close = difflib.get_close_matches(name, [*FIELD_KEYS, *TABLE_FIELDS], n=1)
    raise ConfigError(f"make_config() got an unknown keyword {name!r}"
                      + (f"; did you mean {close[0]!r}?" if close else ""), key=name)


def check_reader_endpoints(config: Config) -> None:
    """ConfigError (key ``readers.endpoint``) for a derived reader endpoint that passes port
    65535 or the unix socket path limit, or that another configured endpoint also uses."""
    taken = {ep: key for key, ep in config.all_endpoints() if key != "readers.endpoint"}
    spread = (f"reader I listens on readers.endpoint's port plus I (tcp) or on <name>-I.<suffix> "
              f"(ipc), for I < readers.count ({config.readers})")
    for i, ep in enumerate(config.reader_endpoints()):
        what = f"reader {i}'s endpoint {ep}"
        if ep.startswith("tcp://"):
            if int(split_host_port(ep[len("tcp://"):])[1]) > 65535:
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


def check_durability(config: Config) -> None:
    """ConfigError (key ``durability.flush_interval``) for a flush interval beside ``sync`` or
    ``metasync`` false: the interval takes the place of the fsync per commit those two tune,
    and ``sync = false`` means never to flush at all."""
    if not config.flush_interval:
        return
    for key, on in (("durability.sync", config.sync), ("durability.metasync", config.metasync)):
        if not on:
            raise ConfigError(
                f"durability.flush_interval = {config.flush_interval:g} needs {key} = true; "
                f"got {key} = false",
                key="durability.flush_interval", file=config.path,
                hint="flush_interval > 0 flushes every that many seconds instead of every "
                "commit, sync = false never flushes, metasync = false still flushes every "
                f"commit: set flush_interval = 0, or {key} = true")
