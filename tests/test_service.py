"""The service `lmshard init` + `lmshard up` give a user, under a real supervisord: every program
runs and answers (owners, reader pool, monitor, alerts), the monitor's port is the config's,
and what would keep a process from starting is refused before anything starts."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import lmshard
from lmshard.ops.supervise.conf import SupervisorFiles
from lmshard.ops.supervise.rpc import supervisord_pid
from tests.cluster import lmshard_cli
from tests.test_supervisor import Service, make_service

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

PREFLIGHT_SECONDS = 2.0
"""What the issue asks of a refused start: the old path took 18 s of supervisord retries."""


def status(svc: Service) -> dict:
    done = svc.cli("status", "--json")
    return json.loads(done.stdout)


def test_up_runs_every_program_and_each_one_answers(tmp_path: Path, run_dir: Path) -> None:
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2")
    try:
        svc.up()
        ctl = lmshard_cli("ctl", "-c", str(svc.toml), "status")  # supervisorctl itself
        states = dict(line.split()[:2] for line in ctl.stdout.splitlines())
        assert states == {name: "RUNNING" for name in [
            "lmshard:monitor", "lmshard:reader_00", "lmshard:reader_01", "lmshard:shard_00",
            "lmshard:shard_01", "lmshard_alerts"]}, ctl.stdout
        for where in (["-c", str(svc.toml), "pid", "lmshard:shard_01"],  # -c before or after
                      ["pid", "lmshard:shard_01", "-c", str(svc.toml)],
                      ["pid", f"--config={svc.toml}", "lmshard:shard_01"]):
            pid = lmshard_cli("ctl", *where)
            assert pid.returncode == 0 and int(pid.stdout) == svc.rpc().getProcessInfo(
                "lmshard:shard_01")["pid"], (where, pid.stdout, pid.stderr)

        # /metrics, at the address the monitor reports (the config asks for port 0)
        url = next(p["metrics"] for p in status(svc)["processes"] if p.get("metrics"))
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                body = resp.read().decode()
            if 'lmshard_shard_up{shard="0"} 1.0' in body and 'shard_up{shard="1"} 1.0' in body:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)

        with lmshard.connect(svc.toml) as c:
            c.put("blobs", 7, b"seven")
        # With the owners stopped, only the reader pool can answer a remote get.
        stop = lmshard_cli("ctl", "-c", str(svc.toml), "stop", "lmshard:shard_00",
                           "lmshard:shard_01")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        with lmshard.connect(svc.toml, local_reads=False, retries=0) as c:
            assert c.get("blobs", 7) == b"seven"
            assert c.counters()["remote_reads"] == 1
    finally:
        svc.cli("down")


def _read_every_shard(toml: str, together: object) -> None:
    with lmshard.connect(toml) as c:
        for key in range(64):  # blobs spread over both shards by key
            c.get("blobs", key)
        together.wait(60)  # type: ignore[attr-defined] - every reader holds its slots at once


def test_status_shows_the_reader_slots_held_not_lmdbs_high_water_mark(
    tmp_path: Path, run_dir: Path
) -> None:
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2")
    try:
        svc.up()
        before = [p["health"] for p in status(svc)["processes"] if "shard" in p]
        ctx = mp.get_context("spawn")
        together = ctx.Barrier(5)
        procs = [ctx.Process(target=_read_every_shard, args=(str(svc.toml), together))
                 for _ in range(5)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        after = [p["health"] for p in status(svc)["processes"] if "shard" in p]
        for b, a in zip(before, after, strict=True):
            assert a["readers"] == b["readers"]  # the five readers' slots are free again
            assert a["readers_high_water"] >= b["readers"] + 5  # LMDB's num_readers
        text = svc.cli("status").stdout
        assert f"readers {after[0]['readers']}/126" in text
    finally:
        svc.cli("down")


def test_up_refuses_a_monitor_port_another_process_holds(tmp_path: Path, run_dir: Path) -> None:
    with socket.socket() as other:  # another service's monitor, say
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        svc = make_service(tmp_path / "svc", run_dir, "--shards", "1")
        text = svc.toml.read_text().replace('http = "127.0.0.1:0"', f'http = "127.0.0.1:{port}"')
        svc.toml.write_text(text)
        try:
            done = svc.cli("up")
            assert done.returncode == 2, done.stdout + done.stderr
            assert f"monitor.http: 127.0.0.1:{port} is already in use" in done.stderr
            assert supervisord_pid(svc.files) is None
        finally:
            svc.cli("down")


# --------------------------------------------------------------------------------------------
# A schema that cannot run is refused by init and up before anything starts
# --------------------------------------------------------------------------------------------

SCHEMA = """
import lmshard
schema = lmshard.Schema("svc")
accounts = schema.table("accounts", table_id="7d1f0c2a-5b3e-4f6a-9c8d-1e2f3a4b5c6d",
                        key="str", value="cbor"{pinned})
accounts.index("by_email", lambda a: a["email"]{unique})
"""


def write_schema(where: Path, *, pinned: bool = False, unique: bool = False,
                 broken: bool = False) -> None:
    text = SCHEMA.format(pinned=", pinned=True" if pinned else "",
                         unique=", unique=True" if unique else "")
    if broken:
        text += "\nraise RuntimeError('half-written schema module')\n"
    (where / "svcschema.py").write_text(textwrap.dedent(text))


def init_args(base: Path, src: Path, run_dir: Path) -> list[str]:
    return ["init", str(base), "--schema", "svcschema:schema", "--python-path", str(src),
            "--run-dir", str(run_dir), "--monitor-http", "127.0.0.1:0", "--shards", "2"]


@pytest.mark.parametrize("problem, words", [
    ({"broken": True}, "RuntimeError: half-written schema module"),
    ({"unique": True}, "unique index accounts.by_email cannot be enforced over 2 shards"),
])
def test_init_refuses_a_schema_that_cannot_run_and_writes_nothing(
    tmp_path: Path, run_dir: Path, problem: dict, words: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_schema(src, **problem)
    started = time.monotonic()
    done = lmshard_cli(*init_args(tmp_path / "svc", src, run_dir))
    assert time.monotonic() - started < PREFLIGHT_SECONDS
    assert done.returncode in (1, 2) and words in done.stderr, done.stderr
    assert not (tmp_path / "svc").exists()  # nothing that makes the next init refuse
    write_schema(src, pinned=True, unique=True)
    assert lmshard_cli(*init_args(tmp_path / "svc", src, run_dir)).returncode == 0


def test_up_refuses_a_schema_that_broke_or_moved_its_rows_before_starting_anything(
    tmp_path: Path, run_dir: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_schema(src, unique=False)
    assert lmshard_cli(*init_args(tmp_path / "svc", src, run_dir)).returncode == 0
    svc = Service(tmp_path / "svc" / "lmshard.toml", lmshard.config.load_config(
        tmp_path / "svc" / "lmshard.toml"), SupervisorFiles.read(
        tmp_path / "svc" / "supervisord.conf"))
    try:
        svc.up()
        with lmshard.connect(svc.toml, schema=_import_schema(src)) as c:
            c.put("accounts", "ada", {"email": "ada@example.org"})
        assert svc.cli("down").returncode == 0

        for problem, words in [
            ({"unique": True}, "unique index accounts.by_email cannot be enforced"),
            ({"broken": True}, "RuntimeError: half-written schema module"),
            ({"pinned": True}, "table 'accounts' (7d1f0c2a-5b3e-4f6a-9c8d-1e2f3a4b5c6d) was "
                               "placed on shards by"),
        ]:
            write_schema(src, **problem)
            started = time.monotonic()
            done = svc.cli("up")
            assert time.monotonic() - started < PREFLIGHT_SECONDS, problem
            assert done.returncode in (1, 2), done.stdout
            assert words in done.stderr, done.stderr
            assert supervisord_pid(svc.files) is None
        write_schema(src)
        svc.up()  # the schema the data was written with starts again
    finally:
        svc.cli("down")


def _import_schema(src: Path) -> lmshard.Schema:
    sys.path.insert(0, str(src))
    try:
        import importlib

        import svcschema  # type: ignore[import-not-found]

        return importlib.reload(svcschema).schema  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(src))


def test_clients_ride_through_a_restart_of_every_owner(tmp_path: Path, run_dir: Path) -> None:
    """`lmshard ctl restart` stops an owner cleanly (its socket file goes) and starts it again:
    a writer fails fast only when the service is down, not while supervisord restarts it."""
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2")
    try:
        svc.up()
        done = threading.Event()
        errors: list[BaseException] = []
        written: list[int] = []

        def write() -> None:
            with lmshard.connect(svc.toml) as c:
                n = 0
                while not done.is_set():
                    try:
                        c.put("blobs", n, b"x")
                    except lmshard.ShardUnavailable as exc:
                        errors.append(exc)
                        return
                    written.append(n)
                    n += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for name in ("lmshard:shard_00", "lmshard:shard_01"):
                restart = lmshard_cli("ctl", "-c", str(svc.toml), "restart", name)
                assert restart.returncode == 0, restart.stdout + restart.stderr
        finally:
            done.set()
            writer.join(60)
        assert errors == [] and len(written) > 10
        with lmshard.connect(svc.toml) as c:
            assert c.get_many("blobs", written) == [b"x"] * len(written)
            assert svc.cli("down").returncode == 0
            started = time.monotonic()
            with pytest.raises(lmshard.ShardUnavailable, match="lmshard up"):
                c.put("blobs", 10**9, b"never")  # the service is down: at once, not in 8 s
            assert time.monotonic() - started < c.timeout_ms / 1000
    finally:
        svc.cli("down")
