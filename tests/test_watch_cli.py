"""``lmshard watch`` against real shard owners: live lines, the cursor on Ctrl-C, resuming
with ``--since`` without a gap or a repeat, and the errors for bad and compacted cursors.

The watch runs as its own process (as an operator runs it); the tests wait for its lines,
never for fixed times.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmshard.errors import KeyEncodingError
from lmshard.keys import key_codec, key_from_text
from lmshard.ops.command import EXIT_COMPACTED, EXIT_USAGE
from tests.cluster import WAIT, Cluster, env_for_children, lmshard_cli

CURSOR_RE = re.compile(r"--since (c1-[0-9a-f._]+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("watch"), shards=2)
    cl.start()
    try:
        yield cl
    finally:
        cl.stop()


class WatchProcess:
    """``lmshard watch --json ...`` in a new process; its stdout lines arrive on a queue."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmshard.ops.cli", "watch", "--json", "-c",
             str(cluster.config_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, env=env_for_children())
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` changes printed."""
        out = []
        for _ in range(n):
            try:
                out.append(self.lines.get(timeout=WAIT))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} lines; "
                                     f"exit {self.proc.poll()}") from None
        return out

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: its exit status and stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=WAIT)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def started(cluster: Cluster, w: WatchProcess) -> None:
    """Write a marker until the watch prints it: from then on it sees every change."""
    with cluster.client() as c:
        for i in range(200):
            c.put("counters", "marker", i)
            try:
                line = w.lines.get(timeout=0.25)
            except queue.Empty:
                continue
            assert line["key"] == "marker"
            while not w.lines.empty():  # earlier markers, printed late
                assert w.lines.get()["key"] == "marker"
            return
    raise AssertionError(f"the watch printed nothing (exit {w.proc.poll()})")


def write_blobs(cluster: Cluster, keys: range) -> None:
    with cluster.client() as c, c.batch() as b:
        for k in keys:
            b.put("blobs", k, b"v%d" % k)


def test_watch_prints_changes_and_resumes_from_its_cursor_missing_nothing(
        cluster: Cluster) -> None:
    w = WatchProcess(cluster)
    try:
        started(cluster, w)
        write_blobs(cluster, range(0, 40))
        with cluster.client() as c:
            c.delete("blobs", 0)
        lines = w.take(41)
        assert {(d["key"], d["op"]) for d in lines} == (
            {(k, "put") for k in range(40)} | {(0, "delete")})
        for d in lines:
            value = None if d["op"] == "delete" else b"v%d" % d["key"]
            assert d["table"] == "blobs" and d["value"] == (
                None if value is None else {"$base64": base64.b64encode(value).decode()})
        assert {d["shard"] for d in lines} == {0, 1}
        for shard in (0, 1):  # commit order per shard
            txns = [d["txn_id"] for d in lines if d["shard"] == shard]
            assert txns == sorted(txns)
        status, err = w.interrupt()
    finally:
        w.kill()
    assert status == 0, err
    m = CURSOR_RE.search(err)
    assert m, err
    cursor = m.group(1)

    # Written while nobody watched: the resumed watch prints exactly these, nothing earlier.
    write_blobs(cluster, range(100, 130))
    w = WatchProcess(cluster, "--since", cursor)
    try:
        lines = w.take(30)
        assert sorted(d["key"] for d in lines) == list(range(100, 130))
        write_blobs(cluster, range(200, 205))  # and carries on live
        assert sorted(d["key"] for d in w.take(5)) == list(range(200, 205))
        assert w.lines.empty()
        status, err = w.interrupt()
    finally:
        w.kill()
    assert status == 0 and CURSOR_RE.search(err), err


def test_watch_filters_by_table_and_prefix(cluster: Cluster) -> None:
    w = WatchProcess(cluster, "events", "--prefix", "s1")
    try:
        with cluster.client() as c:
            for i in range(400):  # until the watch is on: it prints only s1's events
                c.put("events", ("s1", i), {"i": i})
                c.put("events", ("s2", i), {"i": i})
                c.put("counters", "other", i)
                if not w.lines.empty():
                    break
                time.sleep(0.05)
            first = w.take(1)[0]
            c.put("events", ("s1", 1000), {"i": "last"})
        rest = []
        while not rest or rest[-1]["key"] != ["s1", 1000]:
            rest += w.take(1)
    finally:
        w.kill()
    for d in [first, *rest]:
        assert d["table"] == "events" and d["key"][0] == "s1", d
    assert rest[-1]["value"] == {"i": "last"}


def test_bad_and_compacted_cursors_are_clear_errors(cluster: Cluster) -> None:
    cfg = str(cluster.config_path)
    r = lmshard_cli("watch", "--since", "yesterday", "-c", cfg)
    assert r.returncode == EXIT_USAGE and "not a change-feed cursor" in r.stderr, r.stderr
    r = lmshard_cli("watch", "--since", "c1-0123456789abcdef.1.0", "-c", cfg)
    assert r.returncode == EXIT_USAGE and "positions for 1 shards" in r.stderr, r.stderr
    r = lmshard_cli("watch", "events", "--prefix", '["s1", "x"]', "-c", cfg)
    assert r.returncode == EXIT_USAGE and "not a decimal integer" in r.stderr, r.stderr
    r = lmshard_cli("watch", "nosuchtable", "-c", cfg)
    assert r.returncode == EXIT_USAGE and "no table 'nosuchtable'" in r.stderr, r.stderr

    # A cursor of another history (the log was started anew, say by a restore): compacted,
    # and the message names the oldest cursor still available, which then works.
    with cluster.client() as c, c.watch(since="start") as watch:
        good = watch.cursor
    parts = good[3:].split("_")
    parts[1] = "0123456789abcdef" + parts[1][16:]
    r = lmshard_cli("watch", "--since", "c1-" + "_".join(parts), "-c", cfg)
    assert r.returncode == EXIT_COMPACTED, r.stderr
    assert "shard 1's change log was started anew" in r.stderr, r.stderr
    oldest = re.search(r"oldest cursor still available is (c1-[0-9a-f._]+)", r.stderr)
    assert oldest, r.stderr
    w = WatchProcess(cluster, "--since", oldest.group(1))
    try:
        write_blobs(cluster, range(300, 301))
        while w.take(1)[0]["key"] != 300:
            pass
    finally:
        w.kill()


def test_a_watch_from_start_waits_for_a_slow_owner(cluster: Cluster) -> None:
    """One owner answers (with changes) before the other: the watch still starts on both."""
    write_blobs(cluster, range(400, 410))
    os.kill(cluster.pid(1), signal.SIGSTOP)
    timer = threading.Timer(1.0, os.kill, (cluster.pid(1), signal.SIGCONT))
    timer.start()
    try:
        with cluster.client() as c, c.watch(since="start") as watch:
            assert watch.get(WAIT) is not None
    finally:
        timer.join()
        os.kill(cluster.pid(1), signal.SIGCONT)


def test_a_new_watch_starts_as_soon_as_every_owner_answers(cluster: Cluster) -> None:
    """Not after the client's timeout: a STARTED from each owner is enough, no change needed."""
    with cluster.client() as c:
        timeout = c.timeout_ms / 1000 * (c.retries + 1)
        for since in ("now", "start"):
            t = time.monotonic()
            with c.watch("users", since=since):
                took = time.monotonic() - t
            assert took < timeout / 3, (since, took, timeout)


def test_key_from_text_is_to_json_read_back() -> None:
    cases: list[tuple[Any, Any]] = [
        ("str", "abc"), ("uint64", 7), ("int64", -7), ("bytes", b"\x00\xff"),
        ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
        (("str", "uint64"), ("s1", 2)), (("uuid", "bytes"), (
            uuid.UUID(int=5), b"ab")),
    ]
    for spec, key in cases:
        codec = key_codec(spec)
        shown = codec.to_json(key)
        text = json.dumps(shown) if isinstance(shown, list) else str(shown)
        assert key_from_text(spec, text) == key, (spec, text)
    assert key_from_text(("str", "uint64"), "s1") == ("s1",)
    assert key_from_text(("str", "uint64"), '["s1"]') == ("s1",)
    assert key_from_text("timestamp", "1970-01-01T00:00:01+00:00").timestamp() == 1.0
    for spec, text in [("uint64", "x"), ("bytes", "zz"), ("uuid", "no"),
                       (("str", "uint64"), '["a", 1, 2]'), (("str", "uint64"), "[oops")]:
        with pytest.raises(KeyEncodingError):
            key_from_text(spec, text)


def test_watch_is_listed_in_the_help() -> None:
    r = lmshard_cli("watch", "--help")
    assert r.returncode == 0 and "--since CURSOR" in r.stdout and "--prefix KEY" in r.stdout


def test_a_config_without_the_change_log_says_so(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, shards=1, changes_enabled=False)
    try:
        r = lmshard_cli("watch", "-c", str(cl.config_path))
    finally:
        shutil.rmtree(cl.run_dir, ignore_errors=True)
    assert r.returncode == EXIT_USAGE and "change log is off" in r.stderr, r.stderr
