"""What stats publishing costs batched writes: owners with stats off and on, side by side.

    python bench/stats_overhead.py [--rows 40000] [--batch 1000] [--rounds 11] [--shards 4]
                                   [--sync] [--intervals 1.0,0.1]

Starts one set of real shard owners per setting, all at once: stats off (``LMSHARD_STATS=0`` in
the owners' environment) and on at each interval (1.0 s is the default config; 0.1 s makes the
per-message work ten times as frequent). Each round writes ``--rows`` new records in batches of
``--batch`` from this process to every setting in turn, rotating the order per round, so drift
on a shared machine hits every setting alike; round 1 is a warm-up and not counted. Prints the
median, min and max ops/s per setting, the ratio of medians to "off", and the median and range
of the per-round paired ratios (a measure of the noise), and the owners' CPU time per op
(from /proc, so Linux only), which other processes on the machine disturb much less.

Second, a measurement that the machine's noise hardly touches: the owner-side cost of the
channel itself, timed in this process (``after_commit`` per commit, ``publish`` per message),
times the commit and message rates seen during the runs, as a fraction of the owner's time.
Sync is off by default: without fsync a commit is cheapest, so the stats' share is largest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmshard import stats_board, stats_wire  # noqa: E402
from tests.cluster import Cluster  # noqa: E402


def record(i: int) -> dict[str, object]:
    return {"id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
            "score": i * 0.5, "city": "Berlin", "tags": ["alpha", "beta", "gamma"]}


class Listener(threading.Thread):
    """Follows one cluster's stats in the background; keeps every message."""

    def __init__(self, config: Any) -> None:
        super().__init__(daemon=True)
        self.board = stats_board.StatsBoard(config)
        self.messages: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.sub = stats_board.StatsSubscriber(config)
        update = self.board.update

        def record_update(shard: int, body: dict[str, Any], now: float | None = None) -> None:
            update(shard, body, now)
            self.messages.append(body)

        self.board.update = record_update  # type: ignore[method-assign]

    def run(self) -> None:
        while not self.stop.is_set():
            self.sub.poll(self.board, 100)
        self.sub.close()


def owner_cpu(cluster: Cluster) -> float:
    """CPU seconds the cluster's owner processes (every thread) have run, from /proc schedstat
    (nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for shard in range(cluster.config.shards):
        for task in Path(f"/proc/{cluster.pid(shard)}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just ended
    return total / 1e9


def write_round(client: Any, start: int, rows: int, batch: int) -> float:
    """Write rows [start, start + rows) in batches; ops/s."""
    t = time.perf_counter()
    for s in range(start, start + rows, batch):
        with client.batch() as b:
            for i in range(s, min(s + batch, start + rows)):
                b.put("records", i, record(i))
    return rows / (time.perf_counter() - t)


def channel_costs(base: Path, interval: float) -> tuple[float, float]:
    """(seconds per after_commit, seconds per publish) of a stats channel, in this process."""
    from lmshardd.owner import ShardOwner
    from lmshardd.stats import StatsChannel

    cl = Cluster(base, shards=1, stats_interval=interval)
    owner = ShardOwner(cl.config, 0)
    try:
        ch = StatsChannel(owner)
        n = 200_000
        t = time.perf_counter()
        for i in range(n):
            ch.after_commit(3, 300, 0.0001 + (i % 7) * 1e-5)
        per_commit = (time.perf_counter() - t) / n
        ch.publish(time.monotonic())
        m = 500
        costs = []
        for _ in range(m):
            for j in range(50):  # a window with some commits in it, as under load
                ch.after_commit(2, 200, 0.0001 + j * 1e-6)
            t = time.perf_counter()
            ch.publish(time.monotonic())
            costs.append(time.perf_counter() - t)
        ch.close()
        return per_commit, statistics.median(costs)
    finally:
        owner.close()
        shutil.rmtree(cl.run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40_000, help="records per round and setting")
    ap.add_argument("--batch", type=int, default=1000, help="records per client batch")
    ap.add_argument("--rounds", type=int, default=11, help="rounds, the first one a warm-up")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--sync", action="store_true", help="fsync every commit (default: off)")
    ap.add_argument("--intervals", default="1.0,0.1",
                    help="stats intervals to measure, comma-separated (default 1.0,0.1)")
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x]
    # "off again" is an A/A control: how far two identical settings drift apart shows the noise.
    settings: list[tuple[str, float | None]] = [("off", None), ("off again", None)]
    settings += [(f"on, every {iv:g} s", iv) for iv in intervals]

    tmp = Path(tempfile.mkdtemp(prefix="lmsb-stats-"))
    clusters: dict[str, Cluster] = {}
    listeners: dict[str, Listener] = {}
    clients: dict[str, Any] = {}
    rates: dict[str, list[float]] = {name: [] for name, _ in settings}
    cpu: dict[str, list[float]] = {name: [] for name, _ in settings}
    try:
        for k, (name, iv) in enumerate(settings):
            cl = Cluster(tmp / f"c{k}", shards=args.shards, sync=args.sync, map_size="256MiB",
                         stats_interval=iv or 1.0, timeout_ms=30000, retries=2)
            if iv is None:
                os.environ[stats_wire.ENV_SWITCH] = "0"  # inherited by these owners only
            try:
                cl.start()
            finally:
                os.environ.pop(stats_wire.ENV_SWITCH, None)
            clusters[name] = cl
            clients[name] = cl.client()
            if iv is not None:
                listeners[name] = Listener(cl.config)
                listeners[name].start()

        print(f"{args.rows:,} records per round in batches of {args.batch:,}, {args.shards} "
              f"shards, sync {'on' if args.sync else 'off'}, {args.rounds} rounds "
              f"(round 1 warm-up); load before: {os.getloadavg()[0]:.2f}", flush=True)
        order = [name for name, _ in settings]
        for rnd in range(args.rounds):
            rot = order[rnd % len(order):] + order[:rnd % len(order)]
            line = []
            for name in rot:
                used = owner_cpu(clusters[name])
                rate = write_round(clients[name], rnd * args.rows, args.rows, args.batch)
                if rnd:
                    rates[name].append(rate)
                    cpu[name].append((owner_cpu(clusters[name]) - used) / args.rows)
                line.append(f"{name}: {rate:,.0f}")
            print(f"  round {rnd + 1}{' (warm-up)' if not rnd else ''}: " + ", ".join(line)
                  + f"  [load {os.getloadavg()[0]:.2f}]", flush=True)
    finally:
        for lst in listeners.values():
            lst.stop.set()
            lst.join()
        for c in clients.values():
            c.close()
        for cl in clusters.values():
            cl.stop()

    try:
        off = statistics.median(rates["off"])
        print(f"\n{'setting':<18} {'median ops/s':>13} {'min':>10} {'max':>10} "
              f"{'vs off':>8}  paired ratio per round: median [min, max]")
        for name, _ in settings:
            r = rates[name]
            med = statistics.median(r)
            paired = [a / b for a, b in zip(r, rates["off"], strict=True)]
            extra = "" if name == "off" else (
                f"  {statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]")
            print(f"{name:<18} {med:>13,.0f} {min(r):>10,.0f} {max(r):>10,.0f} "
                  f"{med / off:>8.3f}{extra}")
        spread = (max(rates["off"]) - min(rates["off"])) / off
        print(f"noise: 'off' alone spans {spread:.1%} of its median across rounds")
        print("\nowner CPU time per write op (every owner thread, /proc schedstat; other load "
              "disturbs it less):")
        print(f"{'setting':<18} {'median us/op':>13} {'vs off':>8}  paired ratio per round: "
              "median [min, max]")
        cpu_off = statistics.median(cpu["off"])
        for name, _ in settings:
            med = statistics.median(cpu[name])
            paired = [a / b for a, b in zip(cpu[name], cpu["off"], strict=True)]
            extra = "" if name == "off" else (
                f"  {statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]")
            print(f"{name:<18} {med * 1e6:>13.2f} {med / cpu_off:>8.3f}{extra}")

        print("\nowner-side cost of the channel, timed in this process:")
        # The busiest window any shard reported in any setting (short windows see the peaks).
        commits = max((m["rates"]["commits"] for lst in listeners.values()
                       for m in lst.messages), default=0.0)
        for name, iv in settings:
            if iv is None:
                continue
            per_commit, per_publish = channel_costs(tmp / f"cost-{iv:g}", iv)
            msgs = listeners[name].messages
            built = sorted(m["publish_seconds"] for m in msgs) or [0.0]
            per_message = max(per_publish, statistics.median(built))
            share = commits * per_commit + per_message / iv
            print(f"  {name}: after_commit {per_commit * 1e9:,.0f} ns x {commits:,.0f} "
                  f"commits/s (busiest window seen) + a message every {iv:g} s at "
                  f"{per_message * 1e6:,.0f} us = {share:.3%} of an owner's time\n"
                  f"    (building a message: {per_publish * 1e6:,.0f} us here; in the owners "
                  f"median {statistics.median(built) * 1e6:,.0f} us, "
                  f"max {built[-1] * 1e6:,.0f} us over {len(built)} messages)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
