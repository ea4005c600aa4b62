"""The lmshard CLI without a running supervisord: init, the generated config, config discovery,
stale sockets, the eventlistener protocol, the demo schema."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmshard
from lmshard.config import ConfigError, load_config
from lmshard.ops import cli
from lmshard.ops.command import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_USAGE
from lmshard.ops.supervise.conf import (
    EVENTLISTENER,
    PROGRAMS,
    SupervisorFiles,
    render_supervisord_conf,
)
from lmshard.ops.supervise.control import supervisorctl_command

REPO = Path(__file__).resolve().parent.parent



def init(base: Path, *extra: str) -> Path:
    assert cli.main(["init", str(base), "--schema", "tests.schemas:schema",
                     "--python-path", str(REPO), *extra]) == 0
    return base / "lmshard.toml"


def read_conf(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(path)
    return parser


def test_init_writes_config_dirs_and_supervisord_conf(short_dir: Path) -> None:
    toml = init(short_dir / "svc", "--shards", "3", "--readers", "1")
    config = load_config(toml)
    assert config.shards == 3 and config.readers == 1
    assert config.schema == "tests.schemas:schema"
    assert config.python_path == (REPO,)
    assert config.data_dir == short_dir / "svc" / "var" / "data" and config.data_dir.is_dir()
    assert stat.S_IMODE(config.run_dir.stat().st_mode) == 0o700
    assert (short_dir / "svc" / "var" / "log").is_dir()

    conf = read_conf(short_dir / "svc" / "supervisord.conf")
    assert conf.get("group:lmshard", "programs") == "shard,readers,monitor"
    shard = dict(conf.items("program:shard"))
    assert shard["command"] == (f"{sys.executable} -m lmshardd.main -c {toml} owner "
                                "--shard %(process_num)d")
    assert shard["numprocs"] == "3" and shard["process_name"] == "shard_%(process_num)02d"
    for key, value in [("autorestart", "true"), ("stopsignal", "TERM"), ("stopasgroup", "true"),
                       ("killasgroup", "true"), ("redirect_stderr", "true"), ("startsecs", "1")]:
        assert shard[key] == value, key
    assert int(shard["stopwaitsecs"]) >= 30
    assert 'PYTHONUNBUFFERED="1"' in shard["environment"]
    assert shard["stdout_logfile"].startswith(str(short_dir / "svc" / "var" / "log") + "/")
    assert conf.get("unix_http_server", "file") == str(config.run_dir / "supervisor.sock")
    assert conf.get("unix_http_server", "chmod") == "0700"
    assert conf.get("supervisorctl", "serverurl") == f"unix://{config.run_dir}/supervisor.sock"
    assert conf.has_section("rpcinterface:supervisor")
    assert not conf.has_section("inet_http_server")
    readers = dict(conf.items("program:readers"))
    assert readers["command"] == (f"{sys.executable} -m lmshardd.main -c {toml} readers "
                                  "--index %(process_num)d")
    assert readers["numprocs"] == "1" and readers["process_name"] == "reader_%(process_num)02d"
    assert conf.get("program:monitor", "command") == (
        f"{sys.executable} -m lmshardd.main -c {toml} monitor")
    listener = dict(conf.items("eventlistener:lmshard_alerts"))
    assert listener["command"] == f"{sys.executable} {EVENTLISTENER}"
    assert EVENTLISTENER.is_file()
    assert listener["events"] == "PROCESS_STATE_EXITED,PROCESS_STATE_FATAL"
    assert config.monitor_http == ("127.0.0.1", 9464)


def test_no_readers_and_no_alerts_are_written_commented_out(short_dir: Path) -> None:
    init(short_dir / "svc", "--readers", "0", "--no-alerts", "--monitor-http", "off")
    conf = read_conf(short_dir / "svc" / "supervisord.conf")
    assert conf.get("group:lmshard", "programs") == "shard,monitor"
    assert not conf.has_section("program:readers")
    assert not conf.has_section("eventlistener:lmshard_alerts")
    text = (short_dir / "svc" / "supervisord.conf").read_text()
    assert "(readers: off; readers.count is 0 in the config)" in text
    assert "(alerts: off; switched off with --no-alerts" in text
    assert load_config(short_dir / "svc" / "lmshard.toml").monitor_http is None


def test_supervisord_itself_reads_the_generated_config(short_dir: Path) -> None:
    from supervisor.options import ServerOptions

    init(short_dir / "svc", "--shards", "2")
    options = ServerOptions()
    options.realize(args=["-c", str(short_dir / "svc" / "supervisord.conf")])
    groups = {g.name: [p.name for p in g.process_configs] for g in options.process_group_configs}
    assert groups == {"lmshard": ["shard_00", "shard_01", "reader_00", "reader_01", "monitor"],
                      "lmshard_alerts": ["lmshard_alerts"]}
    group = next(g for g in options.process_group_configs if g.name == "lmshard")
    shard = group.process_configs[1]
    assert shard.command.endswith("owner --shard 1")
    assert shard.stdout_logfile == str(short_dir / "svc" / "var" / "log" / "shard_01.log")
    assert not options.nodaemon
    assert [c["family"] for c in options.server_configs] == [socket.AF_UNIX]


def test_every_program_the_generator_writes_is_a_role_lmshardd_offers(short_dir: Path) -> None:
    config = load_config(init(short_dir / "svc"))
    conf = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    conf.read_string(render_supervisord_conf(config))
    assert conf.get("program:readers", "numprocs") == "2"
    for program in PROGRAMS:
        command = conf.get(f"program:{program}", "command").replace("%(process_num)d", "0")
        argv = [*command.split(), "--help"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (program, done.stderr)


def test_init_refuses_to_overwrite_and_rejects_long_socket_paths(
    short_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init(short_dir / "svc")
    assert cli.main(["init", str(short_dir / "svc")]) == EXIT_USAGE
    assert "--force" in capsys.readouterr().err
    assert cli.main(["init", str(short_dir / "svc"), "--force", "--shards", "2"]) == 0
    assert load_config(short_dir / "svc" / "lmshard.toml").shards == 2

    deep = tmp_path / ("d" * 80)
    assert cli.main(["init", str(deep)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unix socket limit" in err and "--run-dir" in err
    assert not (deep / "lmshard.toml").exists()


def test_config_is_found_by_flag_env_then_default(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = init(short_dir / "svc")
    capsys.readouterr()
    monkeypatch.delenv("LMSHARD_CONFIG", raising=False)
    monkeypatch.chdir(short_dir)
    assert cli.main(["status"]) == EXIT_USAGE  # no ./config/lmshard.toml
    assert "no config file" in capsys.readouterr().err

    monkeypatch.setenv("LMSHARD_CONFIG", str(toml))
    assert cli.main(["status", "--json"]) == EXIT_NOT_RUNNING
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == str(toml) and out["supervisord"]["running"] is False

    (short_dir / "config").mkdir()
    shutil.copy(toml, short_dir / "config" / "lmshard.toml")
    monkeypatch.delenv("LMSHARD_CONFIG")
    assert cli.main(["status"]) == EXIT_USAGE  # found, but no supervisord.conf beside it
    assert "lmshard supervisord-conf" in capsys.readouterr().err
    assert cli.main(["supervisord-conf"]) == 0
    assert (short_dir / "config" / "supervisord.conf").is_file()
    assert cli.main(["status", "-c", str(toml)]) == EXIT_NOT_RUNNING
    assert "not running" in capsys.readouterr().out


def test_down_removes_only_stale_sockets_and_up_refuses_a_live_one(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(init(short_dir / "svc"))
    stale, live = config.run_dir / "shard-00.sock", config.run_dir / "shard-01.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # closed without unlink: what a SIGKILLed owner leaves behind
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(live))
        listener.listen()
        assert cli.main(["down", "-c", str(config.path)]) == 0
        out = capsys.readouterr().out
        assert "was not running" in out and f"removed stale socket {stale}" in out
        assert not stale.exists() and live.exists()
        # a listener without supervisord: an owner left over from a supervisord that died
        assert cli.main(["up", "-c", str(config.path)]) == EXIT_FAILED
        assert f"listens on {live}" in capsys.readouterr().err
        assert not config.run_dir.joinpath("supervisor.sock").exists()
    finally:
        listener.close()


def test_down_removes_every_readers_stale_socket(short_dir: Path) -> None:
    config = load_config(init(short_dir / "svc", "--readers", "3"))
    paths = [Path(ep[len("ipc://"):]) for ep in config.reader_endpoints()]
    assert len(set(paths)) == 3
    for path in paths:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # closed without unlink, as a SIGKILLed reader leaves it
    assert cli.main(["down", "-c", str(config.path)]) == 0
    assert [p for p in paths if p.exists()] == []


def test_ctl_passes_its_arguments_through() -> None:
    args = cli.build_parser().parse_args(["ctl", "-c", "x.toml", "tail", "-f", "lmshard:shard_01"])
    assert args.config == "x.toml" and args.args == ["tail", "-f", "lmshard:shard_01"]
    files = SupervisorFiles(Path("/s/supervisord.conf"), Path("/r/s.sock"), Path("/r/p"),
                            Path("/l/s.log"), Path("/l"))
    assert supervisorctl_command(files, args.args) == [
        sys.executable, "-m", "supervisor.supervisorctl", "-c", "/s/supervisord.conf",
        "tail", "-f", "lmshard:shard_01"]


def test_ctl_takes_its_config_option_wherever_it_is() -> None:
    from lmshard.ops.status import split_config_option

    assert split_config_option(["pid", "lmshard:shard_01", "-c", "x.toml"]) == (
        "x.toml", ["pid", "lmshard:shard_01"])
    assert split_config_option(["tail", "-f", "--config=y.toml", "lmshard:shard_01"]) == (
        "y.toml", ["tail", "-f", "lmshard:shard_01"])
    assert split_config_option(["-cz.toml", "status"]) == ("z.toml", ["status"])
    assert split_config_option(["status"]) == (None, ["status"])
    with pytest.raises(ConfigError, match="needs a file name"):
        split_config_option(["status", "-c"])
    assert cli.main(["ctl", "-c", "a.toml", "status", "-c", "b.toml"]) == 2  # two files


def test_ctl_runs_supervisorctl_on_the_generated_config(short_dir: Path) -> None:
    toml = init(short_dir / "svc")
    done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "ctl", "-c", str(toml),
                           "status"], capture_output=True, text=True, timeout=60)
    # supervisorctl's own answer when nothing listens on the socket of *this* config
    assert "supervisor.sock no such file" in done.stdout + done.stderr
    assert done.returncode != 0


def test_eventlistener_speaks_the_protocol_and_alerts_on_crashes(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts.txt"
    env = dict(os.environ, LMSHARD_ALERT_COMMAND=f'echo "$LMSHARD_EVENT $LMSHARD_PROCESS '
               f'$LMSHARD_PID" >> {alerts}')
    events = [
        ("PROCESS_STATE_EXITED", "processname:shard_01 groupname:lmshard from_state:RUNNING "
         "expected:0 pid:4242"),
        ("PROCESS_STATE_EXITED", "processname:shard_02 groupname:lmshard from_state:RUNNING "
         "expected:1 pid:4243"),  # an expected exit: no alert
        ("PROCESS_STATE_EXITED", "processname:other groupname:other from_state:RUNNING "
         "expected:0 pid:1"),  # not ours
        ("PROCESS_STATE_FATAL", "processname:shard_03 groupname:lmshard from_state:BACKOFF"),
    ]
    stdin = b""
    for n, (name, payload) in enumerate(events):
        body = payload.encode()
        stdin += (f"ver:3.0 server:supervisor serial:{n} pool:lmshard_alerts poolserial:{n} "
                  f"eventname:{name} len:{len(body)}\n").encode() + body
    done = subprocess.run([sys.executable, str(EVENTLISTENER)], input=stdin,
                          capture_output=True, env=env, timeout=60)
    assert done.returncode == 0
    assert done.stdout == b"READY\nRESULT 2\nOK" * len(events) + b"READY\n"
    assert alerts.read_text().splitlines() == [
        "PROCESS_STATE_EXITED lmshard:shard_01 4242", "PROCESS_STATE_FATAL lmshard:shard_03 "]
    err = done.stderr.decode()
    assert "lmshard:shard_01 (pid 4242) exited unexpectedly" in err
    assert "lmshard:shard_03 is FATAL" in err and "shard_02" not in err


def test_demo_schema_is_the_default_configs_schema(tmp_path: Path) -> None:
    import uuid

    from lmshard import demo

    config = load_config(REPO / "config" / "lmshard.toml")
    assert config.load_schema() is demo.schema
    assert sorted(demo.schema.tables) == ["counters", "orders", "users"]
    with lmshard.open(tmp_path / "store", demo.schema) as store:
        uid = uuid.uuid4()
        store.put(demo.users, uid, {"name": "a", "country": "de"})
        store.put(demo.orders, (uid, uuid.uuid4()), {"status": "new", "cents": 100})
        assert store.incr(demo.counters, "orders") == 1
        assert [k for k, _ in store.lookup(demo.users, "by_country", "de")] == [uid]
        assert len(store.lookup(demo.orders, "by_status", "new")) == 1


def test_systemd_unit_runs_supervisord_in_the_foreground() -> None:
    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "deploy" / "lmshard.service")
    start = unit.get("Service", "ExecStart")
    assert "supervisor.supervisord -n -c" in start
    assert unit.get("Service", "Restart") == "on-failure"


def test_demo_refuses_a_service_with_another_schema(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = init(short_dir / "svc")  # tests.schemas:schema
    assert cli.main(["demo", "-c", str(toml), "--seconds", "0.1"]) == EXIT_USAGE
    assert "lmshard.demo:schema" in capsys.readouterr().err


def test_services_and_the_daemon_never_load_the_operator_tooling() -> None:
    code = ("import importlib, pkgutil, sys, lmshard, lmshard.demo, lmshard.testing, lmshardd\n"
            "for m in pkgutil.walk_packages(lmshardd.__path__, 'lmshardd.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lmshard.ops')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_status_names_a_shard_that_refuses_writes_for_a_full_disk() -> None:
    from lmshard.ops import status

    health = {"rtt_ms": 0.5, "txn_id": 9, "last_commit_age": 3.0, "map_used_pct": 1.0,
              "map_size": 2**26, "max_map_used_pct": 0.01, "max_map_size": 2**33,
              "readers": 2, "max_readers": 126, "disk_full": None}
    shard = {"name": "lmshard:shard_00", "state": "RUNNING", "pid": 1, "uptime": 5.0,
             "description": "", "shard": 0, "health": health, "health_error": None}
    assert status._healthy({"processes": [shard]})
    assert "WRITES REFUSED" not in status._health_text(shard)
    health["disk_full"] = {"since": time.time() - 65, "refused": 12, "error": "no space"}
    assert not status._healthy({"processes": [shard]})
    assert status._health_text(shard).startswith(
        "WRITES REFUSED: disk full for 0:01:05 (12 batches)")
