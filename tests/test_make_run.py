"""`make run` from a fresh copy of the repository: serves the default config (4 shards under
./var) in the foreground until Ctrl-C, then leaves nothing running.

The copy gets this test run's venv through symlinks plus its own install stamp, so make skips
`pip install` and the real venv is never touched (the editable install still points at this
checkout's code; the copy contributes its Makefile, config and a fresh ./var).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lmshard.ops.supervise.control import pid_alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SKIP = (".venv", "var", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
        ".hypothesis", "build", "dist", "*.egg-info", "supervisord.conf")


def fresh_copy(dest: Path) -> Path:
    repo = dest / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(*SKIP), symlinks=True)
    venv = repo / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()
    old = time.time() - 3600  # the stamp must be newer than pyproject.toml
    os.utime(repo / "pyproject.toml", (old, old))
    return repo


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def status(repo: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "status", "--json", "-c",
                           str(repo / "config" / "lmshard.toml")],
                          capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.stdout.startswith("{") else {}


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run from a venv")
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_serves_the_default_config_until_ctrl_c() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lms-"))  # short: ipc paths under ./var/run
    repo = fresh_copy(tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("LMSHARD_CONFIG", "MAKEFLAGS")}
    plan = subprocess.run(["make", "-n", "run"], cwd=repo, capture_output=True, text=True,
                          env=env, timeout=60)
    assert "pip install" not in plan.stdout, plan.stdout  # never reinstall the shared venv
    log = open(tmp / "make.out", "w+")
    make = subprocess.Popen(["make", "run"], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            st = status(repo)
            everything = st.get("processes", [])
            procs = [p for p in everything if "shard" in p]
            if (len(procs) == 4 and all(p["health"] for p in procs)
                    and all(p["state"] == "RUNNING" for p in everything)
                    and any(p.get("metrics") for p in everything)):  # the monitor answers
                break
            assert make.poll() is None, (tmp / "make.out").read_text()
            assert time.monotonic() < deadline, (tmp / "make.out").read_text()
            time.sleep(0.2)
        assert [p["name"] for p in procs] == [f"lmshard:shard_{n:02d}" for n in range(4)]
        assert sorted(p["name"] for p in everything if "shard" not in p) == [
            "lmshard:monitor", "lmshard:reader_00", "lmshard:reader_01",
            "lmshard_alerts:lmshard_alerts"]
        assert st["config"] == str(repo / "config" / "lmshard.toml")
        assert (repo / "var" / "data" / "shard-03").is_dir()
        pids = [st["supervisord"]["pid"]] + [p["pid"] for p in everything]

        # The default config's monitor, where the README says it is.
        metrics = "http://127.0.0.1:9464/metrics"
        assert [p["metrics"] for p in everything if "metrics" in p] == [metrics]
        deadline = time.monotonic() + 15
        while 'lmshard_shard_up{shard="3"} 1.0' not in (body := fetch(metrics)):
            assert time.monotonic() < deadline, body
            time.sleep(0.2)

        # Every python example of the README, twice, from the copy's root, as a newcomer would.
        tour = "\n".join(re.findall(r"```python\n(.*?)```", (repo / "README.md").read_text(),
                                    re.S))
        for run in (1, 2):
            done = subprocess.run([sys.executable, "-c", tour], cwd=repo, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            last = done.stdout.splitlines()[-1]
            assert last.startswith("{'name': 'Ada', 'country': 'uk'} 10000 1 "), last
            assert last.endswith(f" {run}")  # the counter counts the runs
        assert not (repo / "data").exists()

        demo = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "demo", "--workers", "2",
                               "--seconds", "1", "-c", str(repo / "config" / "lmshard.toml")],
                              capture_output=True, text=True, timeout=120)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "errors           0" in demo.stdout, demo.stdout
        rows = demo.stdout.split("rows per shard:")[1].splitlines()[2:6]
        assert [int(line.split()[0]) for line in rows] == [0, 1, 2, 3]
        assert sum(int(line.split()[3]) for line in rows) > 0  # users written

        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
        make.wait(60)
        output = (tmp / "make.out").read_text()
        assert "lmshard stopped" in output, output
        assert not [p for p in pids if pid_alive(p)]
        assert not [p for p in (repo / "var" / "run").iterdir() if p.is_socket()]
        assert status(repo)["supervisord"]["running"] is False
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)  # as Ctrl-C: supervisord stops its processes
            try:
                make.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()
        subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "down", "-c",
                        str(repo / "config" / "lmshard.toml")], capture_output=True, timeout=120)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
