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
