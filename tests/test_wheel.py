"""A wheel runs a service: built from a copy of the source, installed into a fresh venv outside
the checkout, then `lmshard init`, `up`, a write and a read, `down`, from that venv alone.

The fresh venv gets lmshard only from the wheel. Its dependencies (lmdb, pyzmq, supervisor,
...) come from this test run's venv through a path file, which puts that site-packages
directory on sys.path without running its own path files, so the editable install of this
checkout stays out of the new venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SKIP = (".venv", "var", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
        ".hypothesis", "build", "dist", "*.egg-info", "supervisord.conf")


def run(argv: list[str | Path], cwd: Path, env: dict[str, str],
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run from a venv")
def test_a_wheel_in_a_fresh_venv_runs_a_service(tmp_path: Path, short_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LMSHARD_CONFIG", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*SKIP), symlinks=True)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist",
                 src], cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "project.license` as a TOML table is deprecated" not in built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("lmshard-*.whl"))

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp_path, env=env).stdout.strip())
    (site / "deps-from-the-test-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                     "--no-index", wheel], cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = run([python, "-c", "import lmshard, lmshardd; print(lmshard.__file__); "
                 "print(lmshardd.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.splitlines() == [str(site / "lmshard" / "__init__.py"),
                                         str(site / "lmshardd" / "__init__.py")], where.stdout

    lmshard_cmd = venv / "bin" / "lmshard"
    home = tmp_path / "home"  # outside the checkout: no config/, no deploy/, no bench/
    home.mkdir()
    init = run([lmshard_cmd, "init", "svc", "--shards", "2", "--run-dir", short_dir,
                "--monitor-http", "127.0.0.1:0"], cwd=home, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    toml = home / "svc" / "lmshard.toml"
    conf = (home / "svc" / "supervisord.conf").read_text()
    assert f"{python} -m lmshardd.main" in conf
    assert f"{python} {site / 'lmshard' / 'ops' / 'templates' / 'eventlistener.py'}" in conf
    try:
        up = run([lmshard_cmd, "up", "-c", toml], cwd=home, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        rw = run([python, "-c", "import sys, uuid, lmshard\n"
                  "from lmshard.demo import users\n"
                  "uid = uuid.UUID(int=7)\n"
                  "with lmshard.connect(sys.argv[1]) as c:\n"
                  "    c.put(users, uid, {'name': 'wheel', 'country': 'se'})\n"
                  "with lmshard.connect(sys.argv[1], local_reads=False) as c:\n"
                  "    print(c.get(users, uid)['name'],\n"
                  "          len(c.lookup(users, 'by_country', 'se')))\n",
                  toml], cwd=home, env=env)
        assert rw.stdout.split() == ["wheel", "1"], rw.stdout + rw.stderr
        status = run([lmshard_cmd, "status", "-c", toml], cwd=home, env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        for program in ("lmshard:shard_01", "lmshard:reader_01", "lmshard:monitor",
                        "lmshard_alerts"):
            assert program in status.stdout
    finally:
        down = run([lmshard_cmd, "down", "-c", toml], cwd=home, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "lmshard stopped" in down.stdout

    bench = run([lmshard_cmd, "bench", "--quick"], cwd=REPO, env=env)  # even from a checkout
    assert bench.returncode == 2
    assert "the benchmark suite is not installed" in bench.stderr
    assert "make bench" in bench.stderr
