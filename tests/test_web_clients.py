"""Clients inside web servers: forks that run no Python hooks, per-call deadlines, and a shard
that is down not stalling calls to the others.

uWSGI forks its workers from the master without running ``os.register_at_fork`` callbacks
(unless ``--lazy-apps``); a plain libc ``fork()`` through ctypes does the same here.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time

import pytest

import lmshard
from tests.cluster import Cluster

_libc = ctypes.CDLL(None, use_errno=True)


def libc_fork_run(child) -> dict:  # type: ignore[no-untyped-def]
    """Run ``child()`` in a process made by libc's fork() (no Python fork hooks run); its
    JSON result, or an AssertionError if it hung (killed after 30 s) or failed."""
    r, w = os.pipe()
    pid = _libc.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(r)
            out = child()
            os.write(w, json.dumps(out).encode())
            status = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(status)
    assert pid > 0, ctypes.get_errno()
    os.close(w)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child of a libc fork hung")
        time.sleep(0.02)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    out = json.loads(data or b"{}")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    return out  # type: ignore[no-any-return]


def test_child_of_a_libc_fork_writes_and_reads_through_its_own_connections(
        cluster: Cluster) -> None:
    with cluster.client(timeout_ms=1000, retries=1) as c:
        c.put("counters", "parent", 1)  # the parent holds sockets to an owner ...
        assert c.get("counters", "parent") == 1  # ... and an open environment
        shard = c.table("counters").shard("parent", c.table("counters").kenc("parent"))
        parent_env = c.local_store(shard).env  # type: ignore[union-attr]
        parent_id = c.owners.client_id

        def child() -> dict:  # type: ignore[type-arg]
            started = time.monotonic()
            c.put("counters", "child", 2)
            n = c.incr("counters", "parent", 10)
            st = c.local_store(shard)
            return {"n": n, "child": c.get("counters", "child"),
                    "seconds": time.monotonic() - started,
                    "own_env": st is not None and st.env is not parent_env,
                    "own_id": c.owners.client_id != parent_id}

        out = libc_fork_run(child)
        assert out == {**out, "n": 11, "child": 2, "own_env": True, "own_id": True}, out
        assert out["seconds"] < 5, out
        # The parent's connections and environment still work, and see the child's writes.
        assert c.get("counters", "child") == 2 and c.incr("counters", "parent") == 12


def test_a_store_used_in_the_child_of_a_libc_fork_reopens_its_environment(
        tmp_path, schema) -> None:  # type: ignore[no-untyped-def]
    store = lmshard.open(tmp_path / "db", schema)
    table = next(iter(schema.tables.values()))
    parent_env = store.env

    def child() -> dict:  # type: ignore[type-arg]
        rows = store.count(table)
        return {"own_env": store.env is not parent_env, "rows": rows}

    assert libc_fork_run(child) == {"own_env": True, "rows": 0}
    store.close()


def keys_on(c: lmshard.Client, table: str, shard: int, n: int) -> list[str]:
    """``n`` keys of ``table`` (str keys) that route to ``shard``."""
    ct, found, i = c.table(table), [], 0
    while len(found) < n:
        key = f"k{i}"
        if ct.shard(key, ct.kenc(key)) == shard:
            found.append(key)
        i += 1
    return found


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True])
def test_bad_deadlines_are_refused(cluster: Cluster, bad) -> None:  # type: ignore[no-untyped-def]
    with cluster.client() as c, pytest.raises(lmshard.TransactionError), c.deadline(bad):
        pass


def test_a_deadline_bounds_a_call_to_a_paused_owner(cluster: Cluster) -> None:
    shard = 1
    with cluster.client(timeout_ms=2000, retries=3, breaker_ms=0) as c:
        key, other = keys_on(c, "counters", shard, 1)[0], keys_on(c, "counters", 2, 1)[0]
        os.kill(cluster.pid(shard), signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(lmshard.DeadlineExceeded, match="may yet be applied"), \
                    c.deadline(0.3):
                c.put("counters", key, 1)
            took = time.monotonic() - started
            # The budget without a deadline is 2 s x 4 attempts; 0.3 s plus scheduling.
            assert 0.25 < took < 2.0, took
            with c.deadline(0.3):  # another shard answers inside the same kind of deadline
                c.put("counters", other, 2)
            with pytest.raises(lmshard.DeadlineExceeded), c.deadline(5), c.deadline(0.2):
                c.incr("counters", key)  # the nested, earlier deadline holds
            assert c.counters()["deadlines"] == 2
        finally:
            os.kill(cluster.pid(shard), signal.SIGCONT)
        assert c.incr("counters", key, 5) in (5, 6, 7)  # the sent writes may have landed
        assert c.get("counters", other) == 2


def test_a_silent_shard_fails_fast_while_the_others_serve(cluster: Cluster) -> None:
    shard = 3
    with cluster.client(timeout_ms=300, retries=1, breaker_ms=1500) as c:
        keys = keys_on(c, "counters", shard, 3)
        others = [k for s in (0, 1, 2) for k in keys_on(c, "counters", s, 2)]
        os.kill(cluster.pid(shard), signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(lmshard.ShardUnavailable, match="did not answer within"):
                c.put("counters", keys[0], 1)  # the whole budget: 300 ms x 2 attempts
            assert time.monotonic() - started >= 0.55
            started = time.monotonic()
            with pytest.raises(lmshard.ShardUnavailable, match="fail at once"):
                c.put("counters", keys[1], 1)
            with pytest.raises(lmshard.ShardUnavailable, match="fail at once"), c.batch() as b:
                b.put("counters", keys[1], 1)
                b.put("counters", others[0], 1)
            assert time.monotonic() - started < 0.25  # vs 0.6 s each without the breaker
            for k in others:  # other shards are not held up
                c.put("counters", k, 7)
        finally:
            os.kill(cluster.pid(shard), signal.SIGCONT)
        time.sleep(1.6)  # the breaker runs out: the next call is the probe, and gets through
        c.put("counters", keys[2], 3)
        c.put("counters", keys[1], 4)
        assert c.get("counters", keys[2]) == 3 and c.get("counters", keys[1]) == 4
        assert [c.get("counters", k) for k in others] == [7] * len(others)


@pytest.mark.slow
def test_an_owner_stopped_under_supervisord_fails_at_once(tmp_path, run_dir) -> None:  # type: ignore[no-untyped-def]
    """`lmshard ctl stop` removes the owner's socket file while supervisord runs: supervisord
    says the owner is STOPPED, so calls fail at once (a restart, where it says STARTING, keeps
    the retries: tests/test_service.py rides through one)."""
    from tests.cluster import lmshard_cli
    from tests.test_supervisor import make_service

    svc = make_service(tmp_path / "svc", run_dir, "--shards", "2")
    try:
        svc.up()
        with lmshard.connect(svc.toml) as c:
            key = keys_on(c, "counters", 1, 1)[0]
            c.put("counters", key, 1)
            stop = lmshard_cli("ctl", "-c", str(svc.toml), "stop", "lmshard:shard_01")
            assert stop.returncode == 0, stop.stdout + stop.stderr
            started = time.monotonic()
            with pytest.raises(lmshard.ShardUnavailable, match="is not running"):
                c.put("counters", key, 2)
            # The budget of a silent owner is 2 s x 4 attempts; a stopped one costs a look.
            assert time.monotonic() - started < 1.5
            start = lmshard_cli("ctl", "-c", str(svc.toml), "start", "lmshard:shard_01")
            assert start.returncode == 0, start.stdout + start.stderr
            c.put("counters", key, 3)
            assert c.get("counters", key) == 3
    finally:
        svc.cli("down")


def test_a_call_that_waited_out_its_deadline_opens_the_breaker(cluster: Cluster) -> None:
    """Otherwise a deadline shorter than the retries would let every call wait it out."""
    shard = 2
    with cluster.client(timeout_ms=2000, retries=3, breaker_ms=2000) as c:
        key = keys_on(c, "counters", shard, 1)[0]
        os.kill(cluster.pid(shard), signal.SIGSTOP)
        try:
            with pytest.raises(lmshard.DeadlineExceeded), c.deadline(0.3):
                c.put("counters", key, 1)
            started = time.monotonic()
            with pytest.raises(lmshard.ShardUnavailable, match="fail at once"), \
                    c.deadline(0.3):
                c.put("counters", key, 2)
            assert time.monotonic() - started < 0.2
        finally:
            os.kill(cluster.pid(shard), signal.SIGCONT)
