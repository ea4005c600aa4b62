"""The re-shard drill: 4 -> 8 shards and back to 4 under a real supervisord while four writers and
four readers run, with the reshard command SIGKILLed and resumed and an owner SIGKILLed in the
middle of a move.

Afterwards no acked write is lost or applied twice (each writer's counter equals its acked
batches, each key holds its last acked round), no read ever went back in time, and every row
lies in exactly one shard: the one its slot belongs to under the config's final map.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard.config import load_config
from lmshard.slot_state import RowSlots
from lmshard.store import Store
from tests import reshard_workers as rw
from tests.test_supervisor import Service, make_service

pytestmark = pytest.mark.slow

WRITERS = 4
READERS = 4


def reshard(svc: Service, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lmshard.ops.cli", "reshard", *args, "-c",
                             str(svc.toml)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def start_workers(svc: Service, tmp: Path, tag: str, first_round: int = 0
                  ) -> tuple[list[Any], list[Path], Path]:
    ctx = mp.get_context("spawn")
    stop = tmp / f"stop-{tag}"
    outs = [tmp / f"{tag}-w{i}.json" for i in range(WRITERS)]
    outs += [tmp / f"{tag}-r{i}.json" for i in range(READERS)]
    procs = [ctx.Process(target=rw.writer,
                         args=(str(svc.toml), i, str(stop), str(outs[i]), first_round))
             for i in range(WRITERS)]
    procs += [ctx.Process(target=rw.reader, args=(str(svc.toml), WRITERS, str(stop),
                                                   str(outs[WRITERS + i])))
              for i in range(READERS)]
    for p in procs:
        p.start()
    return procs, outs, stop


def stop_workers(procs: list[Any], outs: list[Path], stop: Path) -> list[dict[str, Any]]:
    stop.touch()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    errors = [r["error"] for r in results if r["error"]]
    assert not errors, errors[0]
    return results


def merge(model: dict[int, int], counts: dict[int, int], results: list[dict[str, Any]]) -> None:
    """Fold the writers' acked rounds into ``model`` (key -> last round) and ``counts``."""
    for w, r in enumerate(results[:WRITERS]):
        for k, rnd in r["last"].items():
            model[int(k)] = rnd
        counts[w] = counts.get(w, 0) + r["rounds"]
        assert r["rounds"] > 5, r  # the writer did write through the move


def check_store(svc: Service, model: dict[int, int], counts: dict[int, int],
                expected_shards: int) -> None:
    config = load_config(svc.toml)
    assert config.shards == expected_shards
    with lmshard.connect(svc.toml) as c:
        for k, rnd in model.items():
            w = k // 1_000_000 - 1
            assert c.get("items", k) == {"group": w, "r": rnd, "k": k}
        for w, n in counts.items():
            assert c.get("counters", f"rs-{w}") == n  # every acked batch applied once
        assert c.count("items") == len(model)
        assert sorted(k for k, _ in c.scan("items")) == sorted(model)
        for w in range(WRITERS):
            mine = {k for k in model if k // 1_000_000 - 1 == w}
            assert {k for k, _ in c.lookup("items", "by_group", w)} == mine
    # Every row in exactly one shard, the one the final map gives its slot.
    slots = RowSlots(config.slot_map)
    schema = config.load_schema()
    where: dict[tuple[str, bytes], int] = {}
    for shard in range(config.shards):
        store = Store(config.shard_dir(shard), schema, readonly=True)
        try:
            with store.read() as r:
                for name in ("items", "counters"):
                    b = r.tables[name]
                    with r.txn.cursor(db=b.db) as cur:
                        for kb in cur.iternext(values=False):
                            kb = bytes(kb)
                            assert (name, kb) not in where, (name, kb, where[(name, kb)], shard)
                            where[(name, kb)] = shard
                            assert config.slot_map.assignment[slots.slot(b, kb)] == shard
        finally:
            store.close()
    assert sum(1 for (name, _) in where if name == "items") == len(model)


def owner_pid(svc: Service, shard: int) -> int:
    return int(svc.rpc().getProcessInfo(f"lmshard:shard_{shard:02d}")["pid"])


def wait_phase(svc: Service, phase: str, timeout: float = 120) -> None:
    """Until the re-shard's state file names ``phase`` for its current move."""
    state = svc.config.run_dir / "reshard.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if phase in state.read_text():
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"the re-shard never reached {phase}")


def test_grow_4_to_8_and_shrink_back_under_load(tmp_path: Path, run_dir: Path) -> None:
    svc = make_service(tmp_path / "svc", run_dir, "--shards", "4")
    model: dict[int, int] = {}
    counts: dict[int, int] = {}
    try:
        svc.up()
        procs, outs, stop = start_workers(svc, tmp_path, "grow")
        time.sleep(2.0)
        first = reshard(svc, "--shards", "8")
        wait_phase(svc, "copy")
        time.sleep(0.3)
        first.send_signal(signal.SIGKILL)  # the command dies in the middle of a move
        first.wait()
        time.sleep(1.0)  # the writers keep going; the frozen slots (if any) stay frozen
        resumed = reshard(svc, "--resume")
        wait_phase(svc, "catch")
        os.kill(owner_pid(svc, 1), signal.SIGKILL)  # supervisord starts it again
        print(finish(resumed))
        time.sleep(1.0)
        results = stop_workers(procs, outs, stop)
        merge(model, counts, results)
        check_store(svc, model, counts, 8)

        procs, outs, stop = start_workers(svc, tmp_path, "shrink", first_round=10**6)
        time.sleep(1.0)
        print(finish(reshard(svc, "--shards", "4")))
        time.sleep(1.0)
        results = stop_workers(procs, outs, stop)
        merge(model, counts, results)
        check_store(svc, model, counts, 4)
    finally:
        svc.cli("down")
