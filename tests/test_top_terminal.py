"""``lmshard top --once`` on a real pseudo-terminal of 80x24 and of 200x50.

The command runs as a process whose stdin, stdout and stderr are the slave side of a pty with
the window size set (TIOCSWINSZ), so rich finds the width the way it does on a user's terminal.
The owners are real (tests.cluster.Cluster), one of them killed so a shard is not up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
import unicodedata
from collections.abc import Iterator

import pytest

from lmshard.ops import stats_table
from tests.cluster import Cluster, env_for_children

pytestmark = pytest.mark.slow

INTERVAL = 0.2
WAIT = 60.0
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
"""CSI sequences (colours, cursor), OSC sequences (titles, links), other two-byte escapes."""
MAIN_HEADERS = ("shard", "state", "writes/s", "batches/s", "commit ms p50/p99/max", "map %max")
"""What ``top`` must keep at 80 columns."""


def run_in_pty(argv: list[str], cols: int, rows: int, timeout: float = WAIT) -> tuple[int, str]:
    """Run ``argv`` on a new pty of ``cols`` x ``rows``; its exit status and what it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = env_for_children()
    for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                 "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        env.pop(name, None)
    env["TERM"] = "xterm-256color"
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} did not finish: {out.decode(errors='replace')}")
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: the child closed its side
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=timeout), out.decode("utf-8", errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def screen_lines(raw: str) -> list[str]:
    """What the terminal shows, line by line: escapes and carriage returns removed."""
    return [line.rstrip() for line in ANSI.sub("", raw).replace("\r", "").split("\n")]


def cells(line: str) -> int:
    """Terminal cells ``line`` takes (East Asian wide characters take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three owners with some rows written; shard 2's owner is killed (``NO DATA``)."""
    c = Cluster(tmp_path_factory.mktemp("top"), shards=3, stats_interval=INTERVAL)
    c.start()
    try:
        with c.client() as client, client.batch() as b:
            for i in range(300):
                b.put("blobs", i, b"x")
        c.kill(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.run_dir, ignore_errors=True)


@pytest.mark.parametrize("cols, rows", [(80, 24), (200, 50)])
def test_top_once_fits_the_terminal_and_keeps_whole_headers(
        cluster: Cluster, cols: int, rows: int) -> None:
    argv = [sys.executable, "-m", "lmshard.ops.cli", "top", "--once", "-c",
            str(cluster.config_path)]
    status, raw = run_in_pty(argv, cols, rows)
    lines = screen_lines(raw)
    shown = "\n".join(lines)
    assert status == 0, shown
    assert "\x1b[" in raw  # it did see a terminal: colours
    too_wide = [line for line in lines if cells(line) > cols]
    assert not too_wide, shown

    header = next((line for line in lines if line.startswith("shard ")), None)
    assert header is not None, shown
    assert "…" not in header, shown
    headers = re.split(r" {2,}", header.strip())
    for name in MAIN_HEADERS:
        assert name in headers, shown
    if cols >= 200:
        assert headers == [*stats_table.COLUMNS, "writes/s trend"], shown

    states = {}
    for line in lines[lines.index(header) + 1:]:
        words = line.split()
        if len(words) < 2 or not words[0].isdigit():
            break
        states[words[0]] = " ".join(words[1:3]) if words[1] == "NO" else words[1]
    assert states == {"0": "up", "1": "up", "2": "NO DATA"}, shown
