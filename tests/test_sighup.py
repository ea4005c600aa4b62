"""SIGHUP: every lmshard process keeps running and serving, re-reads its config file and says in
one log line whether it changed (and that changes need a restart); under supervisord
`lmshard ctl signal HUP 'lmshard:*'` leaves every process of the group running, same pid.

Real processes throughout; the tests wait for conditions (a log line, a state), never for fixed
times, except where they check that something does not happen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard import config as config_module
from lmshard import stats_board
from lmshard.config import Config
from lmshard.ops.supervise.conf import SupervisorFiles
from lmshard.ops.supervise.rpc import process_infos
from lmshard.remote import ReaderPool
from tests.cluster import REPO, WAIT, Cluster, lmshard_cli, wait_for
from tests.test_readers import Readers

HUP_LINE = "received SIGHUP"



def hup_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if HUP_LINE in line]


def nth_hup_line(log: Path, n: int) -> str | None:
    lines = hup_lines(log)
    return lines[n] if len(lines) > n else None


def hup_and_wait(pid: int, log: Path, proc: subprocess.Popen[bytes] | None = None) -> str:
    """SIGHUP ``pid``; its new log line about it, once written."""
    seen = len(hup_lines(log))
    os.kill(pid, signal.SIGHUP)

    def new_line() -> str | None:
        if proc is not None:
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        lines = hup_lines(log)
        return lines[seen] if len(lines) > seen else None

    return str(wait_for(f"the SIGHUP line in {log.name}", new_line))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


# --------------------------------------------------------------------------------------------
# Each role, started directly
# --------------------------------------------------------------------------------------------


def test_every_config_field_maps_to_a_config_file_key() -> None:
    """The change report names keys as they are written in lmshard.toml."""
    from lmshardd.hangup import CONFIG_KEYS

    keys = set(config_module.SETTINGS)
    for f in dataclasses.fields(Config):
        if f.name not in ("path", "curve"):
            assert CONFIG_KEYS.get(f.name, f.name) in keys, f.name


def test_owner_keeps_serving_and_reports_the_config_on_sighup(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=1, sync=False)
    toml, log = cluster.config_path, tmp_path / "owner-00.log"
    original = toml.read_text()
    try:
        cluster.start()
        proc, pid = cluster.procs[0], cluster.pid(0)
        with cluster.client(local_reads=False) as c:  # reads go to the owner too
            c.put("blobs", 1, b"one")

            line = hup_and_wait(pid, log, proc)
            assert " INFO " in line and f"[{pid}]" in line
            assert f"received SIGHUP: config unchanged ({toml})" in line
            assert proc.poll() is None and c.ping(0)["pid"] == pid
            c.put("blobs", 2, b"two")
            assert c.get_many("blobs", [1, 2]) == [b"one", b"two"]

            # Changed keys are named; the owner goes on with the config it started with.
            edit(toml, 'max_map_size = "8GiB"', 'max_map_size = "16GiB"')
            edit(toml, "timeout_ms = 3000", "timeout_ms = 3500")
            line = hup_and_wait(pid, log, proc)
            assert " INFO " in line and f"config {toml} changed" in line
            assert ("storage.max_map_size takes effect only after a restart: "
                    "`lmshard ctl restart lmshard:shard_00`") in line
            assert "client.timeout_ms is read by clients when they load the config" in line
            assert "slot map" not in line
            assert c.ping(0)["max_map_size"] == 8 << 30  # not applied
            c.put("blobs", 3, b"three")
            assert c.get("blobs", 3) == b"three"

            # A config that does not load: a warning with the error, and nothing else happens.
            toml.write_text(original + "\nshards = [\n")
            line = hup_and_wait(pid, log, proc)
            assert " WARNING " in line and "does not load, ignored" in line
            assert "invalid TOML" in line
            toml.write_text(original.replace("shards = 1", "shards = 0"))
            line = hup_and_wait(pid, log, proc)
            assert " WARNING " in line and "shards" in line
            c.put("blobs", 4, b"four")
            assert c.get("blobs", 4) == b"four"

            toml.write_text(original)
            assert "config unchanged" in hup_and_wait(pid, log, proc)
            assert c.ping(0)["pid"] == pid
        assert proc.poll() is None
    finally:
        cluster.stop()
    assert proc.returncode == 0  # and SIGTERM still stops it cleanly


def test_sighups_while_writing_cost_nothing(tmp_path: Path) -> None:
    """HUPs in quick succession while a client writes: every batch is acked once, no retry,
    the owner answers on, and it reports at least once (HUPs close together may merge)."""
    cluster = Cluster(tmp_path, shards=1, sync=False)
    done = threading.Event()
    sent = 0

    def hup_often(pid: int) -> None:
        nonlocal sent
        while not done.is_set() and sent < 200:
            os.kill(pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.005)

    try:
        cluster.start()
        pid = cluster.pid(0)
        thread = threading.Thread(target=hup_often, args=(pid,))
        written = 0
        with cluster.client() as c:
            thread.start()
            try:
                while written < 1000 or sent < 50:  # however fast this machine writes
                    c.put("counters", f"k{written}", written)
                    written += 1
            finally:
                done.set()
                thread.join()
            assert c.stats()["client"]["retries"] == 0
            assert c.count("counters") == written
            assert c.get("counters", "k0") == 0
            assert c.get("counters", f"k{written - 1}") == written - 1
            assert c.ping(0)["pid"] == pid
        wait_for("a SIGHUP line", lambda: hup_lines(cluster.logs[0]))
        assert all("config unchanged" in line for line in hup_lines(cluster.logs[0]))
        assert cluster.procs[0].poll() is None
    finally:
        cluster.stop()


def test_reader_keeps_serving_and_reports_the_config_on_sighup(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=2, readers=1, sync=False)
    readers = Readers(cluster)
    try:
        cluster.start()
        readers.start()
        proc, log = readers.procs[0], readers.logs[0]
        with cluster.client(local_reads=False) as c:  # reads go through the reader pool
            c.put("blobs", 1, b"one")
            assert c.get("blobs", 1) == b"one"

            line = hup_and_wait(proc.pid, log, proc)
            assert " INFO " in line and "lmshardd.readers" in line
            assert f"received SIGHUP: config unchanged ({cluster.config_path})" in line
            c.put("blobs", 2, b"two")
            assert c.get_many("blobs", [1, 2]) == [b"one", b"two"]
            assert c.stats()["client"]["remote_reads"] >= 2

            edit(cluster.config_path, "count = 1", "count = 2")
            line = hup_and_wait(proc.pid, log, proc)
            assert ("readers.count takes effect only after a restart: "
                    "`lmshard ctl restart lmshard:reader_00`") in line
            assert c.get("blobs", 2) == b"two"
        with ReaderPool(cluster.config, timeout_ms=2000, retries=0) as pool:
            assert pool.ping_each()[0]["pid"] == proc.pid
    finally:
        readers.stop()
        cluster.stop()
    assert proc.returncode == 0


def test_monitor_keeps_serving_and_reports_the_config_on_sighup(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=2, sync=False, stats_interval=0.2)
    log = tmp_path / "monitor.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lmshardd.main", "-c", str(cluster.config_path),
                 "monitor", "--http", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)

        def all_up() -> dict[str, Any] | None:
            assert proc is not None and proc.poll() is None, log.read_text()
            snap = stats_board.query_monitor(cluster.config)
            return snap if snap and snap["shards_up"] == 2 else None

        snap = wait_for("the monitor to see every shard", all_up)
        url = snap["monitor"]["http"]
        line = hup_and_wait(proc.pid, log, proc)
        assert " INFO " in line and "lmshardd.monitor" in line
        assert f"received SIGHUP: config unchanged ({cluster.config_path})" in line

        with cluster.client() as c:
            c.put("blobs", 1, b"one")
            assert c.get("blobs", 1) == b"one"

        def counted() -> bool:
            with urllib.request.urlopen(url + "/stats", timeout=10) as r:
                doc = json.loads(r.read())
            return sum(s["stats"]["ops"] for s in doc["shards"] if s.get("stats")) == 1

        wait_for("the monitor to count the write", counted)
        snap = wait_for("the monitor to answer", all_up)
        assert snap["monitor"]["pid"] == proc.pid and snap["monitor"]["http"] == url

        edit(cluster.config_path, "stats_interval = 0.2", "stats_interval = 0.5")
        line = hup_and_wait(proc.pid, log, proc)
        assert ("monitor.stats_interval takes effect only after a restart: "
                "`lmshard ctl restart lmshard:monitor`") in line
        assert wait_for("the monitor to answer", all_up)["monitor"]["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.stop()


# --------------------------------------------------------------------------------------------
# Under supervisord
# --------------------------------------------------------------------------------------------



@pytest.mark.slow
def test_supervisorctl_signal_hup_leaves_every_process_running(tmp_path: Path,
                                                               run_dir: Path) -> None:
    base = tmp_path / "svc"
    done = lmshard_cli("init", str(base), "--shards", "2", "--schema", "tests.schemas:schema",
                       "--python-path", str(REPO), "--run-dir", str(run_dir), "--alerts")
    assert done.returncode == 0, done.stdout + done.stderr
    toml = base / "lmshard.toml"
    text = toml.read_text()
    # A free port for the monitor's HTTP server, where the config has the key.
    toml.write_text(re.sub(r'(?m)^http = "127\.0\.0\.1:9464"$', 'http = "127.0.0.1:0"', text))
    files = SupervisorFiles.read(base / "supervisord.conf")
    try:
        done = lmshard_cli("up", "-c", str(toml))
        assert done.returncode == 0, done.stdout + done.stderr

        def group_running() -> dict[str, dict[str, Any]] | None:
            infos = {i["fullname"]: i for i in process_infos(files)}
            if all(i["statename"] == "RUNNING" for i in infos.values()):
                return infos
            return None

        before = wait_for("every process RUNNING", group_running)
        ours = {name: i for name, i in before.items() if i["group"] == "lmshard"}
        assert any(i["name"].startswith("shard_") for i in ours.values())
        with lmshard.connect(toml) as c:
            c.put("blobs", 1, b"one")

        done = lmshard_cli("ctl", "-c", str(toml), "signal", "HUP", "lmshard:*")
        assert done.returncode == 0, done.stdout + done.stderr
        for name, info in ours.items():  # each one handled it: its line is in its log
            assert f"{name}: signalled" in done.stdout, done.stdout
            log = Path(info["stdout_logfile"])
            line = wait_for(f"{name}'s SIGHUP line", partial(nth_hup_line, log, 0))
            assert "config unchanged" in line, line
        with lmshard.connect(toml) as c:
            c.put("blobs", 2, b"two")
            assert c.get_many("blobs", [1, 2]) == [b"one", b"two"]
        with lmshard.connect(toml, local_reads=False) as c:
            assert c.get_many("blobs", [1, 2]) == [b"one", b"two"]

        # A changed key: each line names the command that restarts that very process
        # (supervisord tells each child its name).
        toml.write_text(toml.read_text().replace("metasync = true", "metasync = false"))
        done = lmshard_cli("ctl", "-c", str(toml), "signal", "HUP", "lmshard:*")
        assert done.returncode == 0, done.stdout + done.stderr
        for name, info in ours.items():
            log = Path(info["stdout_logfile"])
            line = wait_for(f"{name}'s second SIGHUP line", partial(nth_hup_line, log, 1))
            assert ("durability.metasync takes effect only after a restart: "
                    f"`lmshard ctl restart {name}`") in line, line

        # The alerts eventlistener (its own group) survives a HUP too.
        listeners = [n for n, i in before.items() if i["group"] != "lmshard"]
        assert listeners
        for name in listeners:
            done = lmshard_cli("ctl", "-c", str(toml), "signal", "HUP", name)
            assert done.returncode == 0, done.stdout + done.stderr
        time.sleep(1.0)  # time for supervisord to notice an exit, if there were one

        after = wait_for("every process RUNNING", group_running)
        assert {n: i["pid"] for n, i in after.items()} == \
            {n: i["pid"] for n, i in before.items()}
        supervisord_log = (files.log_dir / "supervisord.log").read_text()
        assert "terminated by SIGHUP" not in supervisord_log
        with lmshard.connect(toml) as c:
            c.put("blobs", 3, b"three")
            assert c.get("blobs", 3) == b"three"
    finally:
        lmshard_cli("down", "-c", str(toml))
