"""`lmshard demo` against real shard owners serving lmshard.demo:schema: one header line, and a
worker process that dies (SIGKILL) is reported with its exit code, the other workers finish and
their totals are printed, and the command exits 1 without a traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmshard.local_service import LocalService

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_service(tmp_path: Path) -> Iterator[LocalService]:
    with LocalService(tmp_path / "svc", "lmshard.demo:schema", shards=2) as svc:
        yield svc


def start_demo(svc: LocalService, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmshard.ops.cli", "demo", "-c", str(svc.config_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def demo_workers(parent: int) -> list[int]:
    """Pids of the worker processes (multiprocessing spawn children) of process ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def count(stdout: str, name: str) -> int:
    m = re.search(rf"^  {name}\s+(\d+)", stdout, re.M)
    assert m, stdout
    return int(m.group(1))


def test_demo_prints_its_header_once(demo_service: LocalService) -> None:
    proc = start_demo(demo_service, "--workers", "2", "--seconds", "1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    headers = [line for line in out.splitlines() if line.startswith("demo")]
    assert headers == [f"demo: 2 workers for 1 s against {demo_service.config_path} "
                       "(2 shards)"], out
    assert count(out, "writes") > 0 and count(out, "workers") == 2
    assert re.search(r"^  errors\s+0$", out, re.M), out


def test_demo_reports_a_worker_that_dies_and_the_totals_of_the_others(
        demo_service: LocalService) -> None:
    seconds = 5.0
    proc = start_demo(demo_service, "--workers", "3", "--seconds", f"{seconds:g}")
    try:
        deadline = time.monotonic() + 60
        while len(workers := demo_workers(proc.pid)) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, workers
            time.sleep(0.05)
        time.sleep(1.5)  # the workers connect and write
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    both = out + err
    assert proc.returncode == 1, both
    assert "Traceback" not in both and "BrokenProcessPool" not in both, both
    assert re.search(rf"^  worker \d \(pid {victim}\) died: killed by SIGKILL \(exit code -9\)",
                     out, re.M), out
    assert out.rstrip().endswith("demo failed: 1 of 3 workers died"), out
    assert [line for line in out.splitlines() if line.startswith("demo:")] == [
        f"demo: 3 workers for {seconds:g} s against {demo_service.config_path} (2 shards)"]
    # The other two ran to the end, and their totals are the ones printed.
    assert re.search(r"^  workers\s+2  of 3: the totals are those of the 2 that finished$",
                     out, re.M), out
    assert float(re.search(r"^  seconds\s+([\d.]+)$", out, re.M).group(1)) >= seconds  # type: ignore[union-attr]
    assert count(out, "writes") > 0 and count(out, "reads") > 0
    assert re.search(r"^  errors\s+0$", out, re.M), out
