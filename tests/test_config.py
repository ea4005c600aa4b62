"""The config file: defaults, precedence, validation messages, sizes, TOML round trip."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmshard.config import (
    DEFAULT_CONFIG,
    ENV_VAR,
    IPC_PATH_MAX,
    PAGE_SIZE,
    Config,
    ConfigError,
    CurveConfig,
    find_config,
    load_config,
    make_config,
    parse_size,
)
from lmshard.errors import Error
from lmshard.routing import SlotMap

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT / "config" / "lmshard.toml"
MULTIHOST_FILE = ROOT / "config" / "example-multihost.toml"
MiB = 2**20
GiB = 2**30


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def write(directory: Path, text: str, name: str = "lmshard.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def same_settings(a: Config, b: Config) -> bool:
    return dataclasses.replace(a, path=None) == dataclasses.replace(b, path=None)


# -- the default file ------------------------------------------------------------------------


def test_default_file_has_documented_values():
    cfg = load_config(DEFAULT_FILE)
    assert cfg.path == DEFAULT_FILE
    assert cfg.shards == 4
    assert cfg.slots == 1024
    assert cfg.slot_map == SlotMap(4, 1024)
    assert cfg.data_dir == ROOT / "var" / "data"  # relative to config/, not the cwd
    assert cfg.run_dir == ROOT / "var" / "run"
    assert cfg.map_size == 64 * MiB
    assert cfg.max_map_size == 8 * GiB
    assert cfg.sync is True
    assert cfg.metasync is True
    assert cfg.max_readers == 126
    assert cfg.schema == "lmshard.demo:schema"
    assert cfg.python_path == ()
    assert cfg.readers == 2
    assert cfg.stats_interval == 1.0
    assert cfg.timeout_ms == 2000
    assert cfg.retries == 3
    assert cfg.local_reads is True
    run = ROOT / "var" / "run"
    assert cfg.endpoints == tuple(f"ipc://{run}/shard-{n:02d}.sock" for n in range(4))
    assert cfg.stat_endpoints == tuple(f"ipc://{run}/stat-{n:02d}.sock" for n in range(4))
    assert cfg.backup_endpoints == tuple(f"ipc://{run}/backup-{n:02d}.sock" for n in range(4))
    assert cfg.reader_endpoint == f"ipc://{run}/readers.sock"
    assert cfg.monitor_endpoint == f"ipc://{run}/monitor.sock"
    assert cfg.curve is None
    assert cfg.non_loopback_endpoints() == []
    assert cfg.shard_dir(3) == ROOT / "var" / "data" / "shard-03"
    assert cfg.endpoint(2) == f"ipc://{run}/shard-02.sock"
    assert cfg.stat_endpoint(1) == f"ipc://{run}/stat-01.sock"
    assert cfg.backup_endpoint(0) == f"ipc://{run}/backup-00.sock"


def test_default_file_matches_built_in_defaults():
    assert same_settings(load_config(DEFAULT_FILE), make_config(base_dir=ROOT))
    assert same_settings(Config.default(base_dir=ROOT), make_config(base_dir=ROOT))


def test_every_key_is_documented_in_the_example_files():
    from lmshard.config import _SPEC

    text = DEFAULT_FILE.read_text() + MULTIHOST_FILE.read_text()
    for key in _SPEC:
        assert f"{key.rpartition('.')[2]} =" in text, key


def test_multihost_example_loads():
    cfg = load_config(MULTIHOST_FILE)
    assert cfg.endpoints == tuple(f"tcp://10.0.0.5:{5500 + n}" for n in range(4))
    assert cfg.stat_endpoints[3] == "tcp://10.0.0.5:5603"
    assert cfg.backup_endpoints[0] == "tcp://10.0.0.5:5700"
    assert cfg.changes_endpoint(2) == "tcp://10.0.0.5:6002"
    assert cfg.local_reads is False
    assert cfg.curve == CurveConfig(
        server_secret_key=Path("/etc/lmshard/keys/server.key_secret"),
        server_public_key=Path("/etc/lmshard/keys/server.key"),
        client_secret_key=Path("/etc/lmshard/keys/client.key_secret"),
        allowed_client_keys=Path("/etc/lmshard/keys/clients"),
    )
    flagged = dict(cfg.non_loopback_endpoints())
    assert len(flagged) == 4 * 4 + 2  # shard, stat, backup and changes endpoints; readers, monitor
    assert flagged["shard.endpoint[1]"] == "tcp://10.0.0.5:5501"
    assert flagged["readers.endpoint"] == "tcp://10.0.0.5:5800"


def test_config_is_frozen_and_hashable():
    cfg = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shards = 8  # type: ignore[misc]
    assert hash(cfg) == hash(make_config())


def test_shard_accessors_check_range():
    cfg = make_config(shards=2)
    for method in (cfg.shard_dir, cfg.endpoint, cfg.stat_endpoint, cfg.backup_endpoint):
        with pytest.raises(ValueError, match="shard 2 out of range"):
            method(2)
        with pytest.raises(ValueError):
            method(-1)


# -- which file ------------------------------------------------------------------------------


def test_precedence_path_then_env_then_cwd(tmp_path, monkeypatch):
    cwd_file = write(tmp_path / "cwd" / "config", "shards = 1\n")
    env_file = write(tmp_path, "shards = 2\n", name="env.toml")
    arg_file = write(tmp_path, "shards = 3\n", name="arg.toml")
    monkeypatch.chdir(tmp_path / "cwd")

    assert find_config() == cwd_file
    assert load_config().shards == 1
    monkeypatch.setenv(ENV_VAR, "")  # empty means unset
    assert load_config().shards == 1

    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert find_config() == env_file
    assert load_config().shards == 2

    assert find_config(arg_file) == arg_file
    assert load_config(arg_file).shards == 3
    assert load_config(str(arg_file)).shards == 3


def test_relative_path_argument_is_made_absolute(tmp_path, monkeypatch):
    write(tmp_path, "shards = 2\n", name="x.toml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("x.toml")
    assert cfg.path == tmp_path / "x.toml"
    assert cfg.path.is_absolute()


def test_default_location_is_relative_to_cwd():
    assert DEFAULT_CONFIG == Path("config") / "lmshard.toml"


def test_missing_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config file") as info:
        load_config()
    assert ENV_VAR in str(info.value)

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=f"from the environment variable {ENV_VAR}") as info:
        load_config()
    assert info.value.file == tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match="from the path argument") as info:
        load_config(tmp_path / "missing.toml")
    assert "missing.toml" in str(info.value)

    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    path = write(
        tmp_path / "etc",
        """
        data_dir = "data"
        run_dir = "../run"
        python_path = ["src", "/abs/lib"]
        [curve]
        server_secret_key = "keys/server.key_secret"
        """,
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "etc" / "data"
    assert cfg.run_dir == tmp_path / "run"
    assert cfg.python_path == (tmp_path / "etc" / "src", Path("/abs/lib"))
    assert cfg.curve is not None
    assert cfg.curve.server_secret_key == tmp_path / "etc" / "keys" / "server.key_secret"
    assert cfg.curve.allowed_client_keys is None


def test_missing_keys_take_defaults_next_to_the_file(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.data_dir == tmp_path / "var" / "data"
    assert cfg.run_dir == tmp_path / "var" / "run"
    assert same_settings(cfg, make_config(base_dir=tmp_path))


# -- validation ------------------------------------------------------------------------------

LONG_DIR = "/tmp/" + "d" * (IPC_PATH_MAX - 10)

BAD = [
    # (snippet, key, fragment of the message)
    ("shards = 0", "shards", "expected an integer from 1 to 256"),
    ("shards = 257", "shards", "got 257"),
    ("shards = true", "shards", "got a boolean (true)"),
    ('shards = "4"', "shards", "got a string ('4')"),
    ("shards = 4.0", "shards", "got a float"),
    ("shards = 4\nslots = 2", "slots", "expected slots >= shards"),
    ("slots = 65537", "slots", "expected an integer from 1 to 65536"),
    ("shard = 4", "shard", "did you mean 'shards'?"),
    ("sync = false", "sync", "did you mean 'durability.sync'?"),
    ("[durability]\nsnyc = true", "durability.snyc", "did you mean 'durability.sync'?"),
    ("[durability]\nsync = 1", "durability.sync", "expected true or false"),
    ('[durability]\nmetasync = "yes"', "durability.metasync", "expected true or false"),
    ("durability = true", "durability", "expected a table ([durability])"),
    ("[durabilty]\nsync = true", "durabilty", "did you mean 'durability'?"),
    ("[shards]\nendpoints = []", "shards", "did you mean [shard]?"),
    ('[storage]\nmap_size = "9GiB"', "storage.map_size", "larger than storage.max_map_size"),
    ('[storage]\nmap_size = "64 furlongs"', "storage.map_size", "unknown unit 'furlongs'"),
    ('[storage]\nmap_size = "lots"', "storage.map_size", "cannot parse 'lots'"),
    ("[storage]\nmap_size = 0", "storage.map_size", "expected a size > 0"),
    ("[storage]\nmap_size = -1", "storage.map_size", "expected a size >= 0"),
    ("[storage]\nmap_size = true", "storage.map_size", "got a boolean"),
    ("[storage]\nmax_map_size = 1.5", "storage.max_map_size", "got a float"),
    ("[storage]\nmax_readers = 0", "storage.max_readers", "expected an integer from 1"),
    ("[storage]\nmax_readers = 65537", "storage.max_readers", "from 1 to 65536"),
    ("[storage]\nmax_readers = 2147483647", "storage.max_readers", "131,072 MiB here"),
    ('schema = "lmshard.demo"', "schema", '"package.module:attr"'),
    ('schema = "lmshard demo:schema"', "schema", '"package.module:attr"'),
    ('schema = "lmshard.demo:"', "schema", '"package.module:attr"'),
    ("schema = 1", "schema", "got an integer (1)"),
    ('python_path = "src"', "python_path", "expected an array of path strings"),
    ("python_path = [1]", "python_path[0]", "expected a path string"),
    ("data_dir = 5", "data_dir", "expected a path"),
    ('data_dir = ""', "data_dir", "expected a path"),
    ("[readers]\ncount = -1", "readers.count", "expected an integer from 0 to 256"),
    ('[readers]\nendpoint = "udp://127.0.0.1:1"', "readers.endpoint", "only ipc and tcp"),
    ("[monitor]\nstats_interval = 0", "monitor.stats_interval", "seconds >= 0.01"),
    ("[monitor]\nstats_interval = 1e-9", "monitor.stats_interval", "seconds >= 0.01"),
    ('[monitor]\nstats_interval = "1s"', "monitor.stats_interval", "seconds >= 0.01"),
    ("[client]\ntimeout_ms = 0", "client.timeout_ms", "expected an integer from 1 to 3600000"),
    ("[client]\ntimeout_ms = 10000000000", "client.timeout_ms", "from 1 to 3600000"),
    ('[shard]\nendpoint = "tcp://0.0.0.0:{port}"\nbase_port = 5500', "shard.endpoint",
     "no concrete host"),
    ("[client]\ntimeout_ms = false", "client.timeout_ms", "got a boolean (false)"),
    ("[client]\nretries = -1", "client.retries", "expected an integer from 0 to 1000"),
    ('[client]\nlocal_reads = "yes"', "client.local_reads", "expected true or false"),
    ("[client]\nlocal_read = true", "client.local_read", "did you mean 'client.local_reads'?"),
    ('[shard]\nendpoint = "inproc://x{shard}"', "shard.endpoint", "only ipc and tcp"),
    ('[shard]\nendpoint = "tcp://*:{port}"\nbase_port = 5500', "shard.endpoint", "concrete host"),
    (
        '[shard]\nendpoint = "tcp://127.0.0.1:{port}"',
        "shard.endpoint",
        "shard.base_port is not set",
    ),
    ('[shard]\nendpoint = "tcp://127.0.0.1"', "shard.endpoint", "port ''"),
    ('[shard]\nendpoint = "tcp://127.0.0.1:99999"', "shard.endpoint", "port '99999'"),
    ('[shard]\nendpoint = "tcp://bad_host!:1{shard}"', "shard.endpoint", "invalid host"),
    ('[shard]\nendpoint = "ipc://rel/s{shard}.sock"', "shard.endpoint", "relative ipc path"),
    ('[shard]\nendpoint = "ipc://{nope}/{shard}"', "shard.endpoint", "unknown placeholder {nope}"),
    ('[shard]\nendpoint = "ipc:///x/{shard:q}"', "shard.endpoint", "bad placeholder"),
    ('[shard]\nendpoint = "ipc://{run_dir}/same.sock"', "shard.endpoint[1]", "also used by"),
    ('[shard]\nendpoint = ["ipc:///tmp/a.sock"]', "shard.endpoint", "one per shard (4)"),
    ("[shard]\nendpoint = 5", "shard.endpoint", "endpoint pattern string"),
    (
        '[shard]\nendpoint = ["ipc:///a.s", "ipc:///b.s", "ipc:///c.s", 7]',
        "shard.endpoint[3]",
        "expected an endpoint string",
    ),
    (
        '[shard]\nendpoint = ["ipc:///a.s", "ipc:///b.s", "ipc:///c.s", "ipc:///a.s"]',
        "shard.endpoint[3]",
        "also used by shard.endpoint[0]",
    ),
    (
        '[shard]\nstat_endpoint = "ipc://{run_dir}/shard-{shard:02d}.sock"',
        "shard.stat_endpoint[0]",
        "also used by shard.endpoint[0]",
    ),
    (
        '[shard]\nendpoint = "tcp://127.0.0.1:{port}"\nbase_port = 65534',
        "shard.base_port",
        "past port 65535",
    ),
    ("[shard]\nbase_port = 0", "shard.base_port", "expected an integer from 1 to 65535"),
    (f'run_dir = "{LONG_DIR}"', "readers.endpoint", "shorter run_dir"),
    # Reader I of the pool listens on readers.endpoint's port plus I (tcp) or on
    # <name>-I<suffix> (ipc): those derived endpoints must be free and valid too.
    (
        '[readers]\ncount = 2\nendpoint = "tcp://127.0.0.1:5800"\n'
        '[monitor]\nendpoint = "tcp://127.0.0.1:5801"',
        "readers.endpoint",
        "reader 1's endpoint tcp://127.0.0.1:5801 is also used by monitor.endpoint",
    ),
    (
        '[readers]\ncount = 3\nendpoint = "tcp://127.0.0.1:5498"\n'
        '[shard]\nendpoint = "tcp://127.0.0.1:{port}"\nbase_port = 5500',
        "readers.endpoint",
        "reader 2's endpoint tcp://127.0.0.1:5500 is also used by shard.endpoint[0]",
    ),
    (
        '[readers]\nendpoint = "ipc://{run_dir}/backup.sock"\n'
        '[shard]\nbackup_endpoint = "ipc://{run_dir}/backup-{shard}.sock"',
        "readers.endpoint",
        "backup-1.sock is also used by shard.backup_endpoint[1]",
    ),
    (
        '[readers]\ncount = 2\nendpoint = "tcp://127.0.0.1:65535"',
        "readers.endpoint",
        "reader 1's endpoint tcp://127.0.0.1:65536 is past port 65535",
    ),
    (
        f'[readers]\nendpoint = "ipc:///tmp/{"d" * (IPC_PATH_MAX - 9)}/r.s"',
        "readers.endpoint",
        f"-1.s is {IPC_PATH_MAX + 2} bytes, longer than the unix socket limit",
    ),
    (
        f'[shard]\nendpoint = "ipc://{LONG_DIR}/{{shard}}.sock"',
        "shard.endpoint",
        "unix socket limit",
    ),
    ("[slot_map]\nruns = [[0, 512, 0], [512, 1024, 1]]", "slot_map.runs", "own no slot"),
    ("[slot_map]\nruns = [[0, 100, 0]]", "slot_map.runs", "expected 0 to 1023"),
    ('[slot_map]\nruns = "even"', "slot_map.runs", "expected an array of [start, end, shard]"),
    ("[slot_map]\nshards = 4", "slot_map.shards", "unknown key"),
    ("[curve]\nserver_secret_key = 5", "curve.server_secret_key", "expected a path"),
    ("[curve]\nserver_key = 'x'", "curve.server_key", "did you mean"),
]


@pytest.mark.parametrize(("snippet", "key", "fragment"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_name_key_and_file(tmp_path, snippet, key, fragment):
    path = write(tmp_path, snippet + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    message = str(err)
    assert err.key == key
    assert err.file == path
    assert message.startswith(f"{path}: {key}: "), message
    assert fragment in message, message
    assert "expected" in message or "did you mean" in message or "also used" in message, message


def test_unknown_key_lists_known_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[client]\nfoo = 1\n"))
    assert "known keys in [client]: timeout_ms, retries, local_reads" in str(info.value)


@pytest.mark.parametrize(("snippet", "key", "meant", "not_meant"), [
    # a value gets a key, even when a table's name is closer by letters, and vice versa
    ("shardz = 4", "shardz", "shards", "shard"),
    ("[shardd]\nendpoint = 'x'", "shardd", "shard", "shards"),
    ("[shardz]\nendpoint = 'x'", "shardz", "shard", "shards"),
    ("[shardss]\nendpoint = 'x'", "shardss", "shard", "shards"),
    ("[durabilty]\nsync = true", "durabilty", "durability", None),
    ("slotz = 1024", "slotz", "slots", "slot_map"),
    ("[slot_mapp]\nruns = []", "slot_mapp", "slot_map", None),
    ("[client]\nretrys = 2", "client.retrys", "client.retries", None),
    # nothing of the fitting kind is close: the closest of the other kind, or the same leaf
    ("storag = 1", "storag", "storage", None),
    ("sync = false", "sync", "durability.sync", None),
])
def test_did_you_mean_suggests_the_kind_that_fits(tmp_path, snippet, key, meant, not_meant):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, snippet + "\n"))
    message = str(info.value)
    assert info.value.key == key
    assert f"did you mean {meant!r}?" in message, message
    if not_meant is not None:
        assert f"did you mean {not_meant!r}" not in message, message


def test_config_error_types():
    err = ConfigError("boom", key="shards", file=Path("/x.toml"))
    assert isinstance(err, Error)
    assert isinstance(err, ValueError)
    assert ConfigError.code == 50
    assert str(err) == "/x.toml: shards: boom"
    assert str(ConfigError("boom", hint="do this")) == "boom (do this)"


@pytest.mark.parametrize(
    ("text", "line"),
    [("shards = \n", 1), ("shards = 4\nslots = = 3\n", 2), ("[client\ntimeout_ms = 1\n", 1)],
)
def test_toml_syntax_errors_name_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == line
    assert info.value.file == path
    assert str(info.value).startswith(f"{path}:{line}: invalid TOML")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "lmshard.toml"
    path.write_bytes(b"schema = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_long_ipc_path_suggests_shorter_run_dir(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_config(run_dir=LONG_DIR)
    assert f"expected at most {IPC_PATH_MAX} bytes" in str(info.value)
    assert LONG_DIR in str(info.value)


def test_make_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'shards'"):
        make_config(shard=2)
    with pytest.raises(ConfigError) as info:
        make_config(shards=0)
    assert info.value.key == "shards"
    assert info.value.file is None


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        (0, 0),
        ("4096", 4096),
        ("64MiB", 64 * MiB),
        ("1GiB", GiB),
        ("512KiB", 512 * 1024),
        ("1TiB", 2**40),
        ("10MB", 10_000_000),
        ("2kb", 2000),
        ("3GB", 3_000_000_000),
        ("1tb", 10**12),
        ("64 mib", 64 * MiB),
        ("64 MIB", 64 * MiB),
        (" 8 GiB ", 8 * GiB),
        ("100b", 100),
        ("1.5KiB", 1536),
        ("0.5GiB", GiB // 2),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value, key="storage.map_size", file=None) == expected


@pytest.mark.parametrize(
    "value", [True, 1.5, None, [], -1, "", "MiB", "-5MiB", "1.5", "10 K", "5 GB extra", "1e6"]
)
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError) as info:
        parse_size(value, key="storage.max_map_size", file=Path("/etc/x.toml"))
    assert str(info.value).startswith("/etc/x.toml: storage.max_map_size: ")


def test_map_sizes_round_up_to_pages(tmp_path):
    cfg = load_config(write(tmp_path, "[storage]\nmap_size = 10000\nmax_map_size = 10001\n"))
    assert cfg.map_size % PAGE_SIZE == 0
    assert cfg.map_size == -(-10000 // PAGE_SIZE) * PAGE_SIZE
    assert cfg.max_map_size == cfg.map_size or cfg.max_map_size % PAGE_SIZE == 0


# -- endpoints -------------------------------------------------------------------------------


def test_endpoint_patterns_and_lists(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
            shards = 3
            [readers]
            endpoint = "tcp://localhost:6000"
            [monitor]
            endpoint = "tcp://[::1]:6001"
            [shard]
            endpoint = "tcp://127.0.0.1:{port}"
            base_port = 5000
            stat_endpoint = ["tcp://10.1.2.3:7000", "tcp://db-1.example:7001", "ipc:///s/{shard}"]
            backup_endpoint = "ipc://{run_dir}/b{shard}.sock"
            """,
        )
    )
    assert cfg.endpoints == ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002")
    assert cfg.stat_endpoints == ("tcp://10.1.2.3:7000", "tcp://db-1.example:7001", "ipc:///s/2")
    assert cfg.backup_endpoints[1] == f"ipc://{tmp_path}/var/run/b1.sock"
    assert cfg.non_loopback_endpoints() == [
        ("shard.stat_endpoint[0]", "tcp://10.1.2.3:7000"),
        ("shard.stat_endpoint[1]", "tcp://db-1.example:7001"),
    ]


def test_make_config_overrides(tmp_path):
    m = SlotMap(8, 64, [s % 8 for s in range(64)])
    cfg = make_config(
        base_dir=tmp_path,
        data_dir="d",
        run_dir=tmp_path / "r",
        slot_map=m,
        sync=False,
        map_size="1MiB",
        endpoints=[f"tcp://127.0.0.1:{9000 + n}" for n in range(8)],
        python_path=[tmp_path / "src"],
        curve=CurveConfig(allowed_client_keys=tmp_path / "clients"),
    )
    assert (cfg.shards, cfg.slots, cfg.slot_map) == (8, 64, m)
    assert cfg.data_dir == tmp_path / "d"
    assert cfg.run_dir == tmp_path / "r"
    assert cfg.sync is False and cfg.metasync is True
    assert cfg.map_size == MiB
    assert cfg.endpoint(7) == "tcp://127.0.0.1:9007"
    assert cfg.python_path == (tmp_path / "src",)
    assert cfg.curve == CurveConfig(allowed_client_keys=tmp_path / "clients")
    assert cfg.path is None


# -- to_toml ---------------------------------------------------------------------------------


def _custom(tmp_path: Path) -> Config:
    return make_config(
        base_dir=tmp_path,
        shards=3,
        slots=12,
        slot_map=SlotMap(3, 12, [0, 1, 2] * 4),
        data_dir='data dir/with "quotes" and \\ backslash',
        run_dir="r",
        map_size=12345,
        max_map_size="3GB",
        sync=False,
        metasync=False,
        max_readers=500,
        schema="my.pkg:things.schema",
        python_path=["src", "/opt/lib"],
        readers=0,
        reader_endpoint="tcp://127.0.0.1:7100",
        monitor_endpoint="ipc:///tmp/lit{{eral}}.sock",
        stats_interval=0.25,
        timeout_ms=150,
        retries=0,
        local_reads=False,
        endpoints=[f"tcp://127.0.0.1:{7000 + n}" for n in range(3)],
        stat_endpoints="ipc://{run_dir}/st-{shard}.sock",
        curve={"server_secret_key": "k/s.key_secret", "allowed_client_keys": "k/clients"},
    )


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("which", ["default", "custom", "multihost"])
def test_to_toml_round_trips(tmp_path, which, relative):
    cfg = {
        "default": lambda: make_config(base_dir=tmp_path),
        "custom": lambda: _custom(tmp_path),
        "multihost": lambda: load_config(MULTIHOST_FILE),
    }[which]()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    text = cfg.to_toml(relative_to=out_dir if relative else None)
    tomllib.loads(text)  # valid TOML
    path = write(out_dir, text)
    loaded = load_config(path)
    assert loaded.path == path
    assert same_settings(loaded, cfg)
    if relative and which != "multihost":
        assert 'data_dir = "../' in text  # written relative to the file's directory
    # writing the loaded config again gives the same text
    assert loaded.to_toml(relative_to=out_dir if relative else None) == text


def test_to_toml_is_compact_for_defaults():
    text = make_config().to_toml()
    assert 'endpoint = "ipc://{run_dir}/shard-{shard:02d}.sock"' in text
    assert 'map_size = "64MiB"' in text
    assert "[slot_map]" not in text
    assert "[curve]" not in text


def test_to_toml_writes_non_default_slot_map(tmp_path):
    text = _custom(tmp_path).to_toml()
    assert "[slot_map]" in text
    assert tomllib.loads(text)["slot_map"]["runs"][:2] == [[0, 1, 0], [1, 2, 1]]


# -- schema ----------------------------------------------------------------------------------


@pytest.fixture
def isolated_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("lmshard_cfgtest_"):
            del sys.modules[name]


def test_load_schema_uses_python_path_once(tmp_path, isolated_sys_path):
    src = tmp_path / "src" / "lmshard_cfgtest_pkg"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "mod.py").write_text("class Holder:\n    schema = object()\n")
    path = write(
        tmp_path / "cfg",
        'schema = "lmshard_cfgtest_pkg.mod:Holder.schema"\npython_path = ["../src"]\n',
    )
    cfg = load_config(path)
    first = cfg.load_schema()
    assert first is cfg.load_schema()
    assert sys.path[0] == str(tmp_path / "src")
    assert sys.path.count(str(tmp_path / "src")) == 1
    import lmshard_cfgtest_pkg.mod as mod  # type: ignore[import-not-found]

    assert first is mod.Holder.schema


def test_load_schema_missing_module(tmp_path, isolated_sys_path):
    path = write(tmp_path, 'schema = "lmshard_cfgtest_missing.schema:schema"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path).load_schema()
    message = str(info.value)
    assert info.value.key == "schema" and info.value.file == path
    assert str(path) in message
    assert "'lmshard_cfgtest_missing.schema'" in message
    assert "python_path" in message


def test_load_schema_missing_attr(tmp_path, isolated_sys_path):
    (tmp_path / "lmshard_cfgtest_noattr.py").write_text("other = 1\n")
    path = write(tmp_path, 'schema = "lmshard_cfgtest_noattr:schema"\npython_path = ["."]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path).load_schema()
    message = str(info.value)
    assert str(path) in message
    assert "no attribute 'schema'" in message
    assert "'lmshard_cfgtest_noattr'" in message


def test_load_schema_broken_module(tmp_path, isolated_sys_path):
    (tmp_path / "lmshard_cfgtest_broken.py").write_text("raise RuntimeError('kaput')\n")
    path = write(tmp_path, 'schema = "lmshard_cfgtest_broken:schema"\npython_path = ["."]\n')
    with pytest.raises(ConfigError, match="RuntimeError: kaput") as info:
        load_config(path).load_schema()
    assert str(path) in str(info.value)


def test_reader_slots_and_pool_endpoints_at_their_limits(tmp_path):
    assert make_config(base_dir=tmp_path, max_readers=65536).max_readers == 65536
    cfg = make_config(base_dir=tmp_path, readers=2, reader_endpoint="tcp://127.0.0.1:65534")
    assert cfg.reader_endpoints() == ["tcp://127.0.0.1:65534", "tcp://127.0.0.1:65535"]
    cfg = make_config(base_dir=tmp_path, readers=0, reader_endpoint="tcp://127.0.0.1:5800",
                      monitor_endpoint="tcp://127.0.0.1:5801")
    assert cfg.reader_endpoints() == []
    # The multihost example spaces them apart: readers 5800..5803, the monitor on 5900.
    assert load_config(MULTIHOST_FILE).reader_endpoints()[-1] == "tcp://10.0.0.5:5803"


# -- one declaration per key -----------------------------------------------------------------


def test_default_file_is_rendered_from_the_declarations():
    from lmshard.config.example import render_default_file

    assert DEFAULT_FILE.read_text() == render_default_file(), (
        "config/lmshard.toml is stale: run python -m lmshard.config.example > "
        "config/lmshard.toml")


def test_every_config_field_declares_its_key():
    from lmshard.config.settings import setting_of, table_class

    for f in dataclasses.fields(Config):
        if f.name != "path":
            assert setting_of(f) is not None or table_class(f) is not None, f.name
    for f in dataclasses.fields(CurveConfig):
        assert setting_of(f) is not None, f.name


def test_every_example_is_a_value_the_loader_accepts(tmp_path):
    from lmshard.config import SETTINGS

    examples = [s for s in SETTINGS.values() if s.example is not None]
    assert {s.key for s in examples} >= {"shard.base_port", "slot_map.runs",
                                         "curve.server_secret_key"}
    for s in examples:
        table = f"[{s.table}]\n" if s.table else ""
        cfg = load_config(write(tmp_path, f"{table}{s.leaf} = {s.example}\n"))
        assert cfg.path is not None, s.key
    runs = tomllib.loads("runs = " + SETTINGS["slot_map.runs"].example)["runs"]
    assert runs == make_config().slot_map.runs()  # "the one shown here" is the default split


def test_to_toml_writes_each_key_under_its_doc(tmp_path):
    from lmshard.config import SETTINGS

    lines = _custom(tmp_path).to_toml().splitlines()
    table = ""
    for n, line in enumerate(lines):
        if line.startswith("["):
            table = line.strip("[]")
        elif line and not line.startswith(("#", " ", "]")):
            key = f"{table}.{line.partition(' =')[0]}".lstrip(".")
            first_words = " ".join(SETTINGS[key].doc.split()[:3])
            doc = [ln for ln in lines[:n] if ln.startswith("# ")]
            assert any(first_words in ln for ln in doc[-8:]), key


def test_to_toml_escapes_what_toml_needs(tmp_path):
    cfg = make_config(base_dir=tmp_path, data_dir='tab\there "q" \\ new\nline é \x85 \u2028 \x7f',
                      schema="pkg.mod:schema")
    text = cfg.to_toml()
    assert same_settings(load_config(write(tmp_path, text)), cfg)


def test_units_are_named_in_messages(tmp_path):
    with pytest.raises(ConfigError, match=r"from 1 to 3600000 \(milliseconds\)"):
        load_config(write(tmp_path, "[client]\ntimeout_ms = 0\n"))


def test_make_config_takes_every_declared_keyword(tmp_path):
    from lmshard.config import FIELD_KEYS

    cfg = make_config(base_dir=tmp_path)
    for name in FIELD_KEYS:
        if hasattr(cfg, name):  # base_port and friends are keys no field holds
            assert same_settings(make_config(base_dir=tmp_path, **{name: getattr(cfg, name)}),
                                 cfg), name


@given(whole=st.integers(0, 10**6), fraction=st.text("0123456789", max_size=12),
       unit=st.sampled_from(["", "B", "kb", "MB", "GB", "TB", "KiB", "mib", "GiB", "TiB"]))
def test_parse_size_is_exact_decimal_arithmetic(whole, fraction, unit):
    text = f"{whole}.{fraction}{unit}" if fraction else f"{whole}{unit}"
    multiplier = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                  "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit.lower()]
    exact = Decimal(text.removesuffix(unit)) * multiplier
    if exact == exact.to_integral_value():
        assert parse_size(text) == int(exact)
    else:
        with pytest.raises(ConfigError, match="not a whole number of bytes"):
            parse_size(text)


@settings(max_examples=60, deadline=None)
@given(shards=st.integers(1, 16), extra_slots=st.integers(0, 100),
       map_pages=st.integers(1, 2**20), sync=st.booleans(), interval=st.floats(0.01, 1e6),
       timeout_ms=st.integers(1, 3_600_000), readers=st.integers(0, 4),
       schema_attr=st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
       data_dir=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
                        min_size=1, max_size=20))
def test_to_toml_round_trips_any_values(shards, extra_slots, map_pages, sync, interval,
                                        timeout_ms, readers, schema_attr, data_dir):
    from lmshard.config.model import build_config

    assume(not data_dir.startswith("~"))  # another user's home: a ConfigError, tested above
    cfg = make_config(base_dir="/srv/x", shards=shards, slots=shards + extra_slots,
                      map_size=map_pages * PAGE_SIZE, max_map_size=map_pages * PAGE_SIZE,
                      sync=sync, stats_interval=interval, timeout_ms=timeout_ms,
                      readers=readers, schema=f"pkg.mod:{schema_attr}", data_dir=data_dir)
    again = build_config(tomllib.loads(cfg.to_toml()), file=None, base_dir=Path("/elsewhere"))
    assert again == cfg


def test_home_of_an_unknown_user_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'python_path = ["~no-such-user-lmshard/src"]\n'))
    assert info.value.key == "python_path[0]"
    assert "expected a path whose ~ names a user of this host" in str(info.value)
