"""The service under a real supervisord: `lmshard up/status/down`, a crash drill with SIGKILLed
owners that supervisord restarts, a shard that cannot start, the foreground mode.

Every test starts its own supervisord through the CLI and stops it with `lmshard down` in a
finally block; ipc sockets live in a short temporary run directory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard.config import Config, load_config
from lmshard.ops import cli
from lmshard.ops.command import EXIT_NOT_RUNNING
from lmshard.ops.supervise.conf import SupervisorFiles
from lmshard.ops.supervise.control import pid_alive
from lmshard.ops.supervise.rpc import rpc, shard_process, supervisord_pid
from tests import workers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    toml: Path
    config: Config
    files: SupervisorFiles

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `lmshard ARGS -c CONFIG` in a new process, as an operator would."""
        return subprocess.run([sys.executable, "-m", "lmshard.ops.cli", *args, "-c",
                               str(self.toml)], capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)

    def up(self, **kw: Any) -> None:
        done = self.cli("up", **kw)
        assert done.returncode == 0, done.stdout + done.stderr

    def rpc(self) -> Any:
        return rpc(self.files).supervisor

    def pids(self) -> list[int]:
        """supervisord's pid and every pid it runs."""
        return [self.rpc().getPID()] + [i["pid"] for i in self.rpc().getAllProcessInfo()
                                        if i["pid"]]

    def wait_running(self, name: str, not_pid: int = 0, timeout: float = 30) -> int:
        """The pid of ``name`` once supervisord says RUNNING (and it is not ``not_pid``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.rpc().getProcessInfo(name)
            if info["statename"] == "RUNNING" and info["pid"] != not_pid:
                return int(info["pid"])
            assert time.monotonic() < deadline, info
            time.sleep(0.05)

    def sockets(self) -> list[Path]:
        return sorted(p for p in self.config.run_dir.iterdir() if p.is_socket())


def make_service(base: Path, run_dir: Path, *args: str) -> Service:
    assert cli.main(["init", str(base), "--schema", "tests.schemas:schema", "--python-path",
                     str(REPO), "--run-dir", str(run_dir), "--monitor-http", "127.0.0.1:0",
                     *args]) == 0
    toml = base / "lmshard.toml"
    config = load_config(toml)
    return Service(toml, config, SupervisorFiles.read(base / "supervisord.conf"))



@pytest.fixture
def service(tmp_path: Path, run_dir: Path) -> Iterator[Service]:
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "3")
    try:
        yield svc
    finally:
        svc.cli("down")


def assert_gone(pids: list[int]) -> None:
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"still running: {alive}"


def test_up_status_down_and_up_again(service: Service) -> None:
    done = service.cli("up")
    assert done.returncode == 0, done.stderr
    assert "waiting for shards: 3/3 up" in done.stdout

    status = json.loads(service.cli("status", "--json").stdout)
    assert sorted(p["name"] for p in status["processes"]) == [
        "lmshard:monitor", "lmshard:reader_00", "lmshard:reader_01", "lmshard:shard_00",
        "lmshard:shard_01", "lmshard:shard_02", "lmshard_alerts:lmshard_alerts"]
    assert all(p["state"] == "RUNNING" for p in status["processes"])
    procs = [p for p in status["processes"] if "shard" in p]
    assert [p["name"] for p in procs] == ["lmshard:shard_00", "lmshard:shard_01",
                                          "lmshard:shard_02"]
    for n, p in enumerate(procs):
        assert p["state"] == "RUNNING" and p["health"]["pid"] == p["pid"]
        assert p["health"]["shard"] == n and p["health"]["max_readers"] == 126
        assert 0 < p["health"]["map_used_pct"] < 100
        assert p["log"] == str(service.files.log_dir / f"shard_{n:02d}.log")
    text = service.cli("status")
    assert text.returncode == 0
    lines = [line for line in text.stdout.splitlines() if line.startswith("lmshard:shard")]
    assert len(lines) == 3 and all(" RUNNING " in line and " ping " in line for line in lines)

    again = service.cli("up")
    assert again.returncode == 1 and "already running" in again.stderr

    with lmshard.connect(service.toml) as c:
        c.put("blobs", 7, b"kept")
    first = service.pids()
    done = service.cli("down")
    assert done.returncode == 0, done.stderr
    assert_gone(first)
    assert service.sockets() == []
    assert not service.files.pidfile.exists()
    assert service.cli("status").returncode == EXIT_NOT_RUNNING

    # A program of the operator's own, in supervisord.d/: regenerating the config keeps it.
    extra = service.toml.parent / "supervisord.d" / "extra.conf"
    extra.parent.mkdir()
    extra.write_text(f"[program:extra]\ncommand={sys.executable} -c "
                     "'import time; time.sleep(3600)'\nstopsignal=KILL\n")
    assert service.cli("supervisord-conf").returncode == 0
    assert extra.exists()
    service.up()  # nothing left behind blocks the next start
    assert service.rpc().getProcessInfo("extra")["statename"] == "RUNNING"
    second = service.pids()
    assert not set(first) & set(second)
    with lmshard.connect(service.toml) as c:
        assert c.get("blobs", 7) == b"kept"
    assert service.cli("down").returncode == 0
    assert_gone(second)
    assert service.sockets() == []


def test_crash_drill_sigkilled_owner_is_restarted_and_writes_stay_exact(
    tmp_path: Path, run_dir: Path
) -> None:
    """Four processes write batches (10 puts + 1 incr) to one shard while its owner is
    SIGKILLed three times; supervisord restarts it, the clients' retries go through, and the
    shard holds every acked batch once, and no half batch."""
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2", "--alerts")
    victim, name = 1, shard_process(1)
    alerts = tmp_path / "alerts.txt"
    env = dict(os.environ, LMSHARD_ALERT_COMMAND=f'echo "$LMSHARD_EVENT $LMSHARD_PROCESS '
               f'$LMSHARD_PID" >> {alerts}')
    try:
        svc.up(env=env)
        ctx = mp.get_context("spawn")
        outs = [tmp_path / f"w{i}.json" for i in range(4)]
        procs = [ctx.Process(target=workers.crash_writer,
                             args=(str(svc.toml), victim, i, str(outs[i]), 9.0))
                 for i in range(4)]
        for p in procs:
            p.start()
        time.sleep(2.0)
        killed = []
        pid = svc.wait_running(name)
        for _ in range(3):
            os.kill(pid, signal.SIGKILL)  # mid-write: four writers keep it busy
            killed.append(pid)
            pid = svc.wait_running(name, not_pid=pid)  # supervisord restarted it
            time.sleep(0.5)
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        results = [json.loads(o.read_text()) for o in outs]
        assert all(r["error"] is None for r in results), [r["error"] for r in results]
        assert sum(r["retries"] for r in results) >= 3  # the writers did live through the kills

        with lmshard.connect(svc.toml) as c:
            for r in results:
                series, acked = r["series"], [n for n, _ in r["acked"]]
                assert len(acked) > 10
                by_batch: dict[int, int] = {}
                for _key, v in c.scan("events", prefix=(series,)):
                    by_batch[v["batch"]] = by_batch.get(v["batch"], 0) + 1
                assert all(n == workers.BATCH for n in by_batch.values())  # no half batch
                assert set(acked) <= set(by_batch)  # every acked batch is there
                assert c.get("counters", series) == len(by_batch)  # each applied once
                assert len(by_batch) <= len(acked) + 1  # at most the one in flight at the end
        assert svc.rpc().getProcessInfo(name)["statename"] == "RUNNING"
        deadline = time.monotonic() + 10  # the eventlistener reported each crash
        expected = [f"PROCESS_STATE_EXITED lmshard:shard_01 {p}" for p in killed]
        while (alerts.read_text().splitlines() if alerts.exists() else []) != expected:
            assert time.monotonic() < deadline, alerts.read_text() if alerts.exists() else ""
            time.sleep(0.1)
    finally:
        svc.cli("down")


def test_up_names_the_shard_that_does_not_come_up(tmp_path: Path, run_dir: Path) -> None:
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2", "--force")
    shard_dir = svc.config.shard_dir(0)
    shard_dir.parent.mkdir(parents=True, exist_ok=True)
    shard_dir.write_text("not a directory")  # what no check before the start can foresee
    try:
        done = svc.cli("up", "--timeout", "3")
        assert done.returncode == 1
        log = svc.files.log_dir / "shard_00.log"
        assert "shard 0 (lmshard:shard_00)" in done.stderr
        assert f"log {log}, last lines:" in done.stderr
        assert str(shard_dir) in done.stderr  # the owner's own words, from its log
        assert supervisord_pid(svc.files) is None  # a failed up leaves nothing running
        assert svc.sockets() == []
    finally:
        svc.cli("down")


def test_foreground_up_stops_everything_on_sigterm(service: Service, tmp_path: Path) -> None:
    out = open(tmp_path / "fg.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lmshard.ops.cli", "up", "--foreground", "-c",
                             str(service.toml)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "lmshard is up" not in (tmp_path / "fg.out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "fg.out").read_text()
            time.sleep(0.1)
        pids = service.pids()
        assert pids[0] != proc.pid  # supervisord is a child of the CLI, not the CLI itself
        proc.send_signal(signal.SIGTERM)  # a service manager stopping us: only we get it
        assert proc.wait(60) == 0, (tmp_path / "fg.out").read_text()
        assert_gone(pids)
        assert service.sockets() == []
        assert "lmshard stopped" in (tmp_path / "fg.out").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
