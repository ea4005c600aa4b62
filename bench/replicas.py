"""What replicas give and cost: local gets on a replica, acks that wait for one, replica lag.

    python -m bench.suite --only replicas [--quick]      # as in `make bench`
    python -m bench.replicas [--rounds 5] [--quick]

Two lmshard services run side by side on this host (4 shard owners each, fsync on, map 1 GiB),
each with one replica of every shard (``replica.names = ["b"]``, one ``lmshardd replica``
process per shard, fsync on too): "r0" acks on the owner's commit (``durability.replicas =
0``), "r1" only once the replica has the commit durably (``durability.replicas = 1``). The
replica is on the same host, so the figures show the protocol's own cost, not a network's.
Rounds alternate the order of the two services.

- Point gets, one client process: reading the owner's copy (``replica.local = ""``) against
  reading the replica's copy (``replica.local = "b"``), same keys, same service (r0); and the
  reader pool's remote get of the same keys, for scale. Target: replica >= 0.9x owner.
- Acked single puts, one client: r1 against r0 (the cost of waiting for a replica; reported).
- Replica lag under batched inserts through ``client.writer()`` on r0 (the replica follows
  asynchronously): every 5 ms during the load, each owner's view of its replica from the
  owner's PING (``replicas.b.lag_seconds``: now minus the commit time of the oldest
  transaction the replica has not said it applied). Target p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine, sys_lmshard
from bench.procs import run_workers
from bench.report import md_table
from bench.systems import REPO, Lmshard

REPLICA = "b"
GET_TARGET = 0.9
LAG_TARGET_MS = 50.0
SAMPLE_EVERY = 0.005


class ReplicatedService:
    """A ``Lmshard`` service plus one replica process per shard, and a second config file
    for processes that read the replica's copy."""

    def __init__(self, required: int, readers: int = 0) -> None:
        self.svc = Lmshard(readers=readers, replica_names=[REPLICA],
                           replicas_required=required)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.spec: dict[str, Any] = {}
        self.replica_spec: dict[str, Any] = {}

    def start(self, base: Path) -> None:
        self.spec = self.svc.start(base)
        svc = self.svc.service
        cfg = svc.config
        local = base / "replica-host.toml"
        from lmshard.config import load_config

        text = Path(self.spec["config"]).read_text()
        local.write_text(text.replace('local = ""', f'local = "{REPLICA}"', 1))
        if load_config(local).replica_local != REPLICA:
            raise RuntimeError(f"could not write a replica host's config at {local}")
        self.replica_spec = {"config": str(local)}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
            "PYTHONPATH", "")]))
        for n in range(cfg.shards):
            log = open(base / f"replica-{n:02d}.log", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "lmshardd.main", "-c", str(local), "replica", "--shard",
                 str(n), "--name", REPLICA], stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 60
        while not all(h is not None and h.get("state") == "following"
                      for h in self.replica_health()):
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a replica exited with {p.returncode}; see {base}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not follow within 60 s; see {base}")
            time.sleep(0.1)

    def replica_health(self, timeout_ms: int = 500) -> list[dict[str, Any] | None]:
        """Each replica's PING answer (None when it did not answer)."""
        return self._health(REPLICA, timeout_ms)

    def owner_health(self, timeout_ms: int = 500) -> list[dict[str, Any] | None]:
        """Each owner's PING answer, with its view of each replica (``replicas``)."""
        return self._health("home", timeout_ms)

    def _health(self, copy: str, timeout_ms: int) -> list[dict[str, Any] | None]:
        from lmshard.copies import ping_copies

        cfg = self.svc.service.config
        return [ping_copies(cfg, n, [copy], timeout_ms / 1000)[copy].health
                for n in range(cfg.shards)]

    def servers(self) -> list[int]:
        return self.svc.servers()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.svc.stop()


class LagSampler(threading.Thread):
    """Reads every replica's lag every SAMPLE_EVERY seconds until stopped."""

    def __init__(self, service: ReplicatedService) -> None:
        super().__init__(daemon=True)
        self.service = service
        self.samples: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for h in self.service.owner_health(200):
                rep = (h or {}).get("replicas", {}).get(REPLICA)
                if rep is not None and rep.get("lag_seconds") is not None:
                    self.samples.append(float(rep["lag_seconds"]) * 1000)
            time.sleep(SAMPLE_EVERY)

    def stop(self) -> list[float]:
        self.halt.set()
        self.join()
        return self.samples


def run(quick: bool, rounds: int, tmp: Path) -> dict[str, Any]:
    rows = 20_000 if quick else 100_000
    puts = 300 if quick else 1_000
    gets = 100_000 if quick else 400_000
    services = {"r0": ReplicatedService(0, readers=1), "r1": ReplicatedService(1)}
    started = time.time()
    monitor = machine.LoadMonitor().start()
    bases: list[Path] = []
    got: dict[str, list[float]] = {"owner": [], "replica": [], "pool": []}
    put1: dict[str, list[float]] = {"r0": [], "r1": []}
    lag: list[float] = []
    insert_rates: list[float] = []
    next_key = 10**10
    try:
        for key, s in services.items():
            base = Path(tempfile.mkdtemp(prefix=f"replicas-{key}-", dir=tmp))
            bases.append(base)
            s.start(base)
        r0 = services["r0"]
        fill = dict(r0.spec, start=0, count=rows, batch=1000)
        run_workers(sys_lmshard.insert_batched, [fill])
        _wait_caught_up(r0)
        r0.svc.start_readers()
        for rnd in range(rounds):
            print(f"replicas, round {rnd + 1}/{rounds}", flush=True)
            order = ("owner", "replica") if rnd % 2 == 0 else ("replica", "owner")
            for which in order:
                spec = dict(r0.spec if which == "owner" else r0.replica_spec, seed=rnd,
                            count=gets, n=rows)
                g = run_workers(sys_lmshard.get_points, [spec])
                got[which].append(g.rate)
                print(f"    gets from the {which:<7} copy {g.rate:>12,.0f}/s", flush=True)
            p = run_workers(sys_lmshard.remote_get,
                            [dict(r0.spec, seed=rnd, count=gets // 20, n=rows, via="pool")])
            got["pool"].append(p.rate)
            print(f"    gets through the reader pool {p.rate:>10,.0f}/s", flush=True)
            for which in (("r0", "r1") if rnd % 2 == 0 else ("r1", "r0")):
                spec = dict(services[which].spec, start=next_key, count=puts)
                next_key += puts
                a = run_workers(sys_lmshard.put_acked, [spec])
                put1[which].append(a.rate)
                print(f"    acked puts, durability.replicas = {which[1]}: {a.rate:>8,.0f}/s",
                      flush=True)
            sampler = LagSampler(r0)
            sampler.start()
            spec = dict(r0.spec, start=next_key, count=rows, batch=1000)
            next_key += rows
            ins = run_workers(sys_lmshard.insert_batched, [spec])
            _wait_caught_up(r0)
            samples = sampler.stop()
            lag.extend(samples)
            insert_rates.append(ins.rate)
            print(f"    replica lag under inserts ({ins.rate:,.0f} rows/s): p50 "
                  f"{np.percentile(samples, 50):.1f} ms, p99 {np.percentile(samples, 99):.1f} "
                  f"ms, max {max(samples):.1f} ms ({len(samples)} samples)", flush=True)
    finally:
        for s in services.values():
            s.stop()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in got.items()}
    return {
        "started": started, "rounds": rounds, "rows": rows, "puts": puts, "gets": gets,
        "load": monitor.result(),
        "gets_per_s": {k: round(v) for k, v in med.items()},
        "replica_vs_owner": round(med["replica"] / med["owner"], 3),
        "replica_vs_owner_rounds": [round(a / b, 3) for a, b in
                                    zip(got["replica"], got["owner"], strict=True)],
        "replica_vs_pool": round(med["replica"] / med["pool"], 1),
        "puts_per_s": {k: round(float(np.median(v))) for k, v in put1.items()},
        "puts_r1_vs_r0": round(float(np.median(put1["r1"])) / float(np.median(put1["r0"])), 3),
        "lag_ms": {"p50": round(float(np.percentile(lag, 50)), 2),
                   "p99": round(float(np.percentile(lag, 99)), 2),
                   "max": round(max(lag), 2), "samples": len(lag)},
        "insert_rows_per_s": round(float(np.median(insert_rates))),
    }


def _wait_caught_up(service: ReplicatedService, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        hs = service.replica_health()
        if all(h is not None and h.get("lag_txns") == 0 for h in hs):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replicas did not catch up within {timeout:.0f} s: {hs}")
        time.sleep(0.05)


def print_summary(r: dict[str, Any]) -> None:
    g, p, lag = r["gets_per_s"], r["puts_per_s"], r["lag_ms"]
    ok = "PASS" if r["replica_vs_owner"] >= GET_TARGET else "MISS"
    print(f"\nReplicas ({r['rounds']} rounds, medians; replica on this host)")
    print(f"  point gets, owner's copy    {g['owner']:>12,}/s")
    print(f"  point gets, replica's copy  {g['replica']:>12,}/s   {r['replica_vs_owner']:.3f}x "
          f"the owner's copy (target >= {GET_TARGET}x: {ok}; per round "
          f"{r['replica_vs_owner_rounds']})")
    print(f"  gets through the reader pool {g['pool']:>11,}/s   the replica's local gets are "
          f"{r['replica_vs_pool']}x that")
    print(f"  acked puts, durability.replicas = 0 {p['r0']:>8,}/s")
    print(f"  acked puts, durability.replicas = 1 {p['r1']:>8,}/s   {r['puts_r1_vs_r0']:.3f}x "
          "(the cost of waiting for a replica; reported)")
    ok = "PASS" if lag["p99"] <= LAG_TARGET_MS else "MISS"
    print(f"  replica lag under batched inserts ({r['insert_rows_per_s']:,} rows/s): p50 "
          f"{lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms, {lag['samples']} "
          f"samples (target p99 <= {LAG_TARGET_MS:.0f} ms: {ok})")


def markdown(r: dict[str, Any], when: str) -> list[str]:
    """The Replicas section of docs/performance.md (bench/report.py writes it from the suite's
    results; ``when`` says the date and the machine's load)."""
    g, p, lag = r["gets_per_s"], r["puts_per_s"], r["lag_ms"]
    get_ok = "PASS" if r["replica_vs_owner"] >= GET_TARGET else "MISS"
    lag_ok = "PASS" if lag["p99"] <= LAG_TARGET_MS else "MISS"
    per_round = ", ".join(f"{x:.3f}" for x in r["replica_vs_owner_rounds"])
    rows = [
        ["figure", "value"],
        ["point gets, one process reading the owner's copy", f"{g['owner']:,} gets/s"],
        [f'point gets, one process reading the replica\'s copy (`replica.local = "{REPLICA}"`)',
         f"{g['replica']:,} gets/s ({r['replica_vs_owner']:.3f}x; per round {per_round}; "
         f"target >= {GET_TARGET}x: {get_ok})"],
        ["the same keys through the reader pool (one reader), for scale",
         f"{g['pool']:,} gets/s (the replica's local gets are {r['replica_vs_pool']:.0f}x "
         "that)"],
        ["acked single puts, `durability.replicas = 0`", f"{p['r0']:,} puts/s"],
        ["acked single puts, `durability.replicas = 1`",
         f"{p['r1']:,} puts/s ({r['puts_r1_vs_r0']:.3f}x: the cost of waiting for a replica's "
         "fsync'd apply; reported)"],
        [f"replica lag under batched inserts ({r['insert_rows_per_s']:,} rows/s through "
         f"`client.writer()`), the owner's view sampled every {SAMPLE_EVERY * 1000:g} ms "
         f"({lag['samples']:,} samples)",
         f"p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, max {lag['max']:.0f} ms (target "
         f"p99 <= {LAG_TARGET_MS:.0f} ms: {lag_ok})"],
    ]
    lines = ["## Replicas (bench/replicas.py)", ""]
    if r["load"]["loaded"]:
        lines += ["> **Measured on a loaded machine**: the rates are lower and the lag higher "
                  "and noisier than on a quiet one.", ""]
    rounds = r["replica_vs_owner_rounds"]
    noise = (": the small difference is noise around 1.0x" if min(rounds) <= 1.0 <= max(rounds)
             else "")
    lines += [
        "`python -m bench.suite --only replicas` (and `make bench`): two services side by side, "
        "four owners each with fsync on, each with one replica of every shard on this same "
        f'host (`replica.names = ["{REPLICA}"]`, four `lmshardd replica` processes, fsync on '
        "too): one acks on the owner's commit (`durability.replicas = 0`), the other once the "
        f"replica has the commit (`durability.replicas = 1`). {r['rows']:,} rows of the "
        f"suite's record; {r['rounds']} rounds of {r['gets']:,} gets from each copy and "
        f"{r['puts']:,} acked puts on each service, orders alternating, medians; {when}; "
        f"during these rounds other processes used {r['load']['others_cores']:.2f} cores.",
        "",
        md_table(rows),
        "",
        "A replica's copy is an ordinary LMDB environment, so reads on its host take the same "
        f"path as on the owner's host{noise}. The put figures carry the replica on this host: "
        "it fsyncs every transaction it applies on the same disk (and both services run at "
        "once); across hosts the replica's fsync is on its own disk, and the cost of "
        "`durability.replicas = 1` is one network round trip plus the replica's apply and "
        "fsync. The lag is how long ago the oldest commit the replica had not yet confirmed "
        "was committed, as the owner sees it (`lmshard_replica_lag_seconds`).",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        print_summary(run(args.quick, 2 if args.quick else args.rounds, Path(tmp)))


if __name__ == "__main__":
    main()
