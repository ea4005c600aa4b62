"""lmshard against raw py-lmdb, zlmdb and Redis: every workload, side by side, in one run.

    make bench                                  # full run; rewrites docs/performance.md
    python -m bench.suite [--quick] [--only NAME[,NAME...]] [--rounds N] [--out DIR]
    lmshard bench --quick                       # the same, from the CLI

Each round starts every system afresh (an empty directory; its own redis-server; four lmshard
shard owners with fsync on), then runs each workload on each system in turn, in an order that
reverses from round to round, so the numbers a ratio compares are taken seconds apart on a
machine whose load may change by the minute. Every workload runs in fresh worker processes released
together (bench.procs); ops/s is items over the wall-clock span of the workers, latencies are
per operation (bench.timing). Prints medians over the rounds, p99 latencies, peak RSS of
server and client, ratios against the baselines and each target with PASS/MISS; a full run
writes docs/perf/results.json, docs/perf/ops.png and docs/performance.md.

Each round also measures the floors (bench.floors): bare pyzmq and unix round trips, raw
py-lmdb commits of what an owner commits, and round trips to the smallest servers that make
those commits before they answer, from which it prints each target beside the floor the design
cannot go below (the acked puts, the time series append, the remote get) or beside raw
py-lmdb (the other in-process workloads), and how close lmshard comes to it.

``--only`` takes workload names (see ``--list``), system names (raw, zlmdb, redis, lmshard),
``scaling``, ``changes`` (the change log's cost and watch lag, bench.change_log) or
``floors`` (which also run whenever the acked puts, ts_append or remote_get do); a run
with ``--quick`` or ``--only`` writes nothing unless given ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: make `bench` importable, here and in workers
    sys.path.insert(0, str(ROOT))

from bench import floors, machine, report  # noqa: E402
from bench.procs import Sample, run_workers  # noqa: E402
from bench.systems import ALL, Lmshard, System  # noqa: E402

TS_APPEND = 1000
"""Points per time series append call."""
DOCS = ROOT / "docs"
PERF = DOCS / "perf"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str
    per: str
    """What one latency sample is."""
    systems: tuple[str, ...] = ("raw", "zlmdb", "redis", "lmshard")


WORKLOADS: tuple[Workload, ...] = (
    Workload("insert", "batched inserts, 1,000 per batch", "rows/s", "batch"),
    Workload("get", "random point get", "gets/s", "get"),
    Workload("get_many", "get_many, 1,000 keys a call (Redis MGET)", "keys/s", "call"),
    Workload("scan", "full scan", "rows/s", "1,000 rows"),
    Workload("prefix", "prefix scan, one series of 100", "rows/s", "scan"),
    Workload("lookup", "unique-index lookup", "lookups/s", "lookup"),
    Workload("put1", "acked single put, 1 client", "puts/s", "put"),
    Workload("put8", "acked single put, 8 clients", "puts/s", "put"),
    Workload("put1_sec", "acked single put, 1 client, fsync each second", "puts/s", "put",
             ("redis", "lmshard")),
    Workload("put8_sec", "acked single put, 8 clients, fsync each second", "puts/s", "put",
             ("redis", "lmshard")),
    Workload("mixed", "mixed 90% get / 10% put, 4 processes", "ops/s", "op"),
    Workload("ts_append", "time series append, 1,000 points a call", "points/s", "append"),
    Workload("ts_range", "time series range query", "points/s", "query"),
    Workload("remote_get", "remote get, reader pool (Redis: GET)", "gets/s", "get",
             ("redis", "lmshard")),
    Workload("remote_get_owner", "remote get, via the owner", "gets/s", "get", ("lmshard",)),
)
BY_KEY = {w.key: w for w in WORKLOADS}
SYSTEM_KEYS = tuple(cls.key for cls in ALL)


@dataclass(frozen=True)
class Sizes:
    rows: int
    """Records in the table (200,000 of about 100 bytes)."""
    one_by_one: int
    """Redis one-command-per-op workloads do this many ops (a rate needs no more)."""
    series: int
    per_series: int
    users: int
    put1: int
    put8_each: int
    mixed_each: int
    ts_series: int
    ts_points: int
    ts_window: int
    ts_queries: int
    remote_gets: int
    scale_rows: int
    commits: tuple[tuple[int, int], ...]
    """Batch sizes of the commit latency table, each with how many batches to time."""
    log_rows: int
    """Change log, log on vs off: rows of one batched insert run."""
    log_puts: int
    """Change log: acked single puts of one run."""
    watch_seconds: float
    """Change log: seconds of one paced write load (watch lag, owner CPU)."""
    batch: int = 1000

    @classmethod
    def make(cls, quick: bool, rows: int | None = None) -> Sizes:
        n = rows or (20_000 if quick else 200_000)
        return cls(
            rows=n, one_by_one=max(1000, n // 10), series=max(10, n // 100), per_series=100,
            users=n // 4, put1=300 if quick else 2000, put8_each=150 if quick else 1000,
            mixed_each=max(500, n // 20), ts_series=10, ts_points=max(2000, n // 10),
            ts_window=1000 if quick else 5000, ts_queries=50 if quick else 200,
            remote_gets=max(1000, n // 10), scale_rows=10_000 if quick else 50_000,
            commits=((1, 100), (10, 100), (100, 50), (1000, 10), (10000, 3)) if quick else
            ((1, 300), (10, 300), (100, 200), (1000, 50), (10000, 10)),
            log_rows=20_000 if quick else 100_000, log_puts=300 if quick else 1000,
            watch_seconds=2.0 if quick else 5.0,
        )


class Results:
    """Samples by workload and system, pooled over rounds; skips with their reasons."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[Sample]]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self.floors: dict[str, list[Sample]] = {}
        """The floors' parts (bench.floors.PARTS) by key, a sample a round."""

    def add(self, workload: str, system: str, sample: Sample) -> None:
        self.samples.setdefault(workload, {}).setdefault(system, []).append(sample)

    def skip(self, workload: str, system: str, reason: str) -> None:
        self.skipped.setdefault(workload, {})[system] = reason

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for w in WORKLOADS:
            per: dict[str, Any] = {}
            for system, samples in self.samples.get(w.key, {}).items():
                lat = np.concatenate([s.latencies_ns for s in samples])
                pct = np.percentile(lat, [50, 99]) / 1000 if len(lat) else [None, None]
                rates = [s.rate for s in samples]
                per[system] = {
                    "rates": [round(r, 1) for r in rates],
                    "median": float(np.median(rates)),
                    "p50_us": None if pct[0] is None else round(float(pct[0]), 2),
                    "p99_us": None if pct[1] is None else round(float(pct[1]), 2),
                    "latency_samples": int(len(lat)),
                    "ops": [s.ops for s in samples],
                    "workers": samples[0].workers,
                    "client_rss_mib": round(max(s.client_rss_kb for s in samples) / 1024, 1),
                    "server_rss_mib": None if samples[0].server_rss_kb is None else round(
                        max(s.server_rss_kb or 0 for s in samples) / 1024, 1),
                }
            for system, reason in self.skipped.get(w.key, {}).items():
                per.setdefault(system, {"skipped": reason})
            if per:
                out[w.key] = {"label": w.label, "unit": w.unit, "per": w.per, "systems": per}
        return out


class Selection:
    """What ``--only`` picked: workloads, systems, and whether the floors, the scaling and
    change log tables run."""

    EXTRAS = ("scaling", "changes", "replicas", "reshard", "floors")
    FLOORED = ("put1", "put1_sec", "put8", "put8_sec", "ts_append", "remote_get")
    """Workloads whose targets are judged against a floor measured apart (bench.floors)."""

    def __init__(self, only: Sequence[str] | None) -> None:
        names = [n.strip() for item in only or () for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_KEY and n not in SYSTEM_KEYS
                   and n not in self.EXTRAS]
        if unknown:
            raise SystemExit(
                f"bench: unknown name(s) for --only: {', '.join(unknown)}; workloads: "
                f"{', '.join(BY_KEY)}; systems: {', '.join(SYSTEM_KEYS)}; or "
                f"{', '.join(self.EXTRAS)}")
        wl = [n for n in names if n in BY_KEY]
        sy = [n for n in names if n in SYSTEM_KEYS]
        whole = not names or (not wl and "lmshard" in sy)
        self.scaling = "scaling" in names or whole
        self.changes = "changes" in names or whole
        self.replicas = "replicas" in names or whole
        self.reshard = "reshard" in names or whole
        self.floors = "floors" in names or whole or any(w in wl for w in self.FLOORED)
        extras_only = bool(names) and all(n in self.EXTRAS for n in names)
        self.workloads = set(wl) if wl else (set() if extras_only else set(BY_KEY))
        self.systems = set(sy) if sy else set(SYSTEM_KEYS)
        self.everything = not names

    def wants(self, *workloads: str) -> bool:
        return any(w in self.workloads for w in workloads)


class Round:
    """One round: every system started afresh, then each workload run on each system in turn,
    so the numbers a ratio compares are taken seconds apart, not minutes."""

    def __init__(self, systems: list[System], sizes: Sizes, sel: Selection, results: Results,
                 tmp: Path) -> None:
        self.systems, self.sz, self.sel, self.res, self.tmp = systems, sizes, sel, results, tmp
        self.specs: dict[str, dict[str, Any]] = {}
        self.bases: list[Path] = []

    def __enter__(self) -> Round:
        for system in self.systems:
            base = Path(tempfile.mkdtemp(prefix=f"{system.key}-", dir=self.tmp))
            self.bases.append(base)
            self.specs[system.key] = system.start(base)
        return self

    def __exit__(self, *exc: object) -> None:
        for system in self.systems:
            system.stop()
        for base in self.bases:
            shutil.rmtree(base, ignore_errors=True)

    def run(self, system: System, workload: str | None, fn_name: str,
            specs: list[dict[str, Any]], servers: list[int] | None = None,
            base: dict[str, Any] | None = None) -> Sample | None:
        """Run one workload's workers; record the sample under ``workload`` (None: a fill).
        Each worker's spec is ``base`` (default: the system's spec this round) plus its own."""
        fn = system.workload(fn_name)
        if fn is None:
            return None
        base = self.specs[system.key] if base is None else base
        specs = [dict(base, **s) for s in specs]
        t = time.perf_counter()
        sample = run_workers(fn, specs, system.servers() if servers is None else servers)
        if workload is None:
            print(f"    {system.label:<12} ({fn_name}: {sample.ops:,} rows in "
                  f"{time.perf_counter() - t:.1f} s)", flush=True)
            return sample
        self.res.add(workload, system.key, sample)
        w = BY_KEY[workload]
        p99 = np.percentile(sample.latencies_ns, 99) / 1000 if len(sample.latencies_ns) else 0
        server = ("" if sample.server_rss_kb is None
                  else f", server {sample.server_rss_kb >> 10} MiB")
        print(f"    {system.label:<12} {workload:<16} {sample.rate:>12,.0f} {w.unit:<10} "
              f"p99 {p99:>9,.1f} us  RSS client {sample.client_rss_kb >> 10} MiB{server}",
              flush=True)
        return sample

    def each(self, workload: str | None, fn_name: str,
             specs: Callable[[str], list[dict[str, Any]]]) -> None:
        """Run a workload on every system of the round (those that have it), in turn."""
        record = workload if workload is not None and self.sel.wants(workload) else None
        for system in self.systems:
            if workload is not None and system.key not in BY_KEY[workload].systems:
                continue
            self.run(system, record, fn_name, specs(system.key))

    def all(self) -> None:
        sz, sel, n = self.sz, self.sel, self.sz.rows

        def one(key: str, count: int) -> int:
            return min(count, sz.one_by_one) if key == "redis" else count

        self.each(None, "setup", lambda k: [{}])
        self.each("insert", "insert_batched",
                  lambda k: [{"start": 0, "count": n, "batch": sz.batch}])
        if sel.wants("get"):
            self.each("get", "get_points", lambda k: [{"seed": 11, "count": one(k, n), "n": n}])
            redis = self.res.samples.get("get", {}).get("redis")
            if redis and sel.wants("remote_get"):
                self.res.add("remote_get", "redis", redis[-1])  # a GET over a socket, as here
        if sel.wants("get_many"):
            self.each("get_many", "get_many",
                      lambda k: [{"seed": 12, "count": n, "n": n, "batch": sz.batch}])
        if sel.wants("scan"):
            self.each("scan", "scan_full", lambda k: [{"n": n}])
        if sel.wants("remote_get", "remote_get_owner"):
            self.remote_gets()
        if sel.wants("prefix"):
            self.each(None, "fill_events",
                      lambda k: [{"series": sz.series, "per_series": sz.per_series}])
            self.each("prefix", "scan_prefix",
                      lambda k: [{"seed": 13, "count": sz.series, "series": sz.series}])
        if sel.wants("lookup"):
            self.each(None, "fill_users", lambda k: [{"count": sz.users}])
            self.each("lookup", "lookup_unique", lambda k: [
                {"seed": 14, "count": one(k, sz.users), "users": sz.users}])
        if sel.floors:
            self.measure_floors()
        if sel.wants("put1", "put8", "mixed", "ts_append", "ts_range"):
            for system in self.systems:
                system.durable_writes(True)
            try:
                self.writes()
            finally:
                for system in self.systems:
                    system.durable_writes(False)
        if sel.wants("put1_sec", "put8_sec"):
            self.every_second_puts()

    def writes(self) -> None:
        sz, sel = self.sz, self.sel
        if sel.wants("put1"):
            self.each("put1", "put_acked", lambda k: [{"start": 10**9, "count": sz.put1}])
        if sel.wants("put8"):
            self.each("put8", "put_acked", lambda k: [
                {"start": 10**9 + 10**7 * (i + 1), "count": sz.put8_each} for i in range(8)])
        if sel.wants("mixed"):
            self.each("mixed", "mixed", lambda k: [
                {"seed": 20 + i, "count": sz.mixed_each, "n": sz.rows, "write_every": 10}
                for i in range(4)])
        if sel.wants("ts_append", "ts_range"):
            self.each("ts_append", "ts_append", lambda k: [
                {"series_ids": list(range(sz.ts_series)), "per_append": TS_APPEND,
                 "appends": sz.ts_points // TS_APPEND}])
        if sel.wants("ts_range"):
            points = sz.ts_points // TS_APPEND * TS_APPEND
            self.each("ts_range", "ts_range", lambda k: [
                {"seed": 15, "count": sz.ts_queries, "series": sz.ts_series, "points": points,
                 "window": min(sz.ts_window, points // 2)}])

    def measure_floors(self) -> None:
        """The floors' parts (bench.floors), in fresh workers as the workloads, right before
        the acked puts they bound."""
        sz = self.sz
        for key, sample in floors.measure(self.tmp, round_trips=sz.remote_gets,
                                          sync_commits=sz.put1, commits=sz.remote_gets,
                                          fill=sz.rows // floors.SHARDS,
                                          group_each=sz.put8_each,
                                          appends=sz.ts_points // TS_APPEND * sz.ts_series):
            self.res.floors.setdefault(key, []).append(sample)
            p50 = np.percentile(sample.latencies_ns, 50) / 1000
            p99 = np.percentile(sample.latencies_ns, 99) / 1000
            print(f"    {'floor':<12} {key:<16} {sample.rate:>12,.0f} {'ops/s':<10} "
                  f"p50 {p50:>9,.1f} us  p99 {p99:>9,.1f} us", flush=True)

    def every_second_puts(self) -> None:
        """Acked single puts with an fsync each second instead of each commit: lmshard's own
        service with ``durability.flush_interval = 1``, Redis with ``appendfsync everysec``."""
        sz = self.sz
        for system in self.systems:
            if system.key not in BY_KEY["put1_sec"].systems:
                continue
            with system.every_second() as base:
                if self.sel.wants("put1_sec"):
                    self.run(system, "put1_sec", "put_acked",
                             [{"start": 3 * 10**9, "count": sz.put1}], base=base)
                if self.sel.wants("put8_sec"):
                    self.run(system, "put8_sec", "put_acked", [
                        {"start": 3 * 10**9 + 10**7 * (i + 1), "count": sz.put8_each}
                        for i in range(8)], base=base)

    def remote_gets(self) -> None:
        for system in self.systems:
            if not isinstance(system, Lmshard):
                continue
            spec = {"seed": 16, "count": self.sz.remote_gets, "n": self.sz.rows}
            if self.sel.wants("remote_get"):
                reason = Lmshard.readers_missing()
                if reason:
                    print(f"    {system.label:<12} remote_get       skipped: {reason}")
                    self.res.skip("remote_get", system.key, reason)
                else:
                    system.start_readers()
                    self.run(system, "remote_get", "remote_get", [dict(spec, via="pool")],
                             servers=system.reader_pids())
            if self.sel.wants("remote_get_owner"):
                self.run(system, "remote_get_owner", "remote_get", [dict(spec, via="owner")])


def run_rounds(systems: list[System], sizes: Sizes, sel: Selection, rounds: int,
               tmp: Path) -> Results:
    results = Results()
    for rnd in range(rounds):
        order = systems if rnd % 2 == 0 else systems[::-1]
        print(f"round {rnd + 1}/{rounds}: {', '.join(s.label for s in order)}", flush=True)
        with Round(order, sizes, sel, results, tmp) as r:
            r.all()
    return results


def pick_systems(sel: Selection) -> tuple[list[System], dict[str, str]]:
    systems: list[System] = []
    missing: dict[str, str] = {}
    in_use = {s for w in sel.workloads for s in BY_KEY[w].systems}
    for cls in ALL:
        if cls.key not in sel.systems or (sel.workloads and cls.key not in in_use):
            continue
        reason = cls.missing()
        if reason:
            print(f"{cls.label}: skipped: {reason}", flush=True)
            missing[cls.key] = reason
            continue
        systems.append(cls())
    return systems, missing


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The suite's options; ``lmshard bench`` registers the same ones."""
    ap.add_argument("--quick", action="store_true",
                    help="20,000 records and fewer ops: a check that everything runs")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only these workloads, systems or 'scaling' (repeat or "
                    "comma-separate); see --list")
    ap.add_argument("--rounds", type=int, default=None, metavar="N",
                    help="rounds per workload and system (default 3; 1 with --quick)")
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="write results.json, ops.png and performance.md here (a full run "
                    "writes docs/perf/ and docs/performance.md)")
    ap.add_argument("--list", action="store_true", help="list workload names and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for w in WORKLOADS:
            print(f"{w.key:<18} {w.label} [{w.unit}]")
        print(f"{'scaling':<18} lmshard throughput by shards and clients, commit latency by "
              "batch size")
        print(f"{'changes':<18} the change log: writes with it on vs off, watch lag, owner CPU "
              "with watchers")
        print(f"{'reshard':<18} lmshard reshard 4 -> 8 -> 4 shards under one client's puts: "
              "write pause per move, put latency, rows moved per second")
        print(f"{'floors':<18} what the design cannot go below: bare pyzmq round trips, raw "
              "py-lmdb commits of a row + client record with and without fsync (also run with "
              "put1, put1_sec, remote_get)")
        return 0
    sel = Selection(args.only)
    quick = bool(args.quick)
    rounds = args.rounds or (1 if quick else 3)
    sizes = Sizes.make(quick, args.rows)
    full = not quick and sel.everything and args.rows is None
    out_dir: Path | None = args.out or (PERF if full else None)
    tmp = Path(tempfile.mkdtemp(prefix="lmshard-bench-"))
    info = machine.describe(tmp)
    monitor = machine.LoadMonitor().start()
    started = time.time()
    print(f"lmshard bench: {sizes.rows:,} records, {rounds} round(s), {info['cores']} cores, "
          f"load {info['load_at_start'][0]:.2f}; temporary files in {tmp}", flush=True)
    try:
        systems, missing = pick_systems(sel)
        for s in systems:
            info["packages"][s.key + "_version"] = s.version()
        results = (run_rounds(systems if sel.workloads else [], sizes, sel, rounds, tmp)
                   if sel.workloads or sel.floors else Results())
        for w in WORKLOADS:
            for key, reason in missing.items():
                if sel.wants(w.key) and key in w.systems:
                    results.skip(w.key, key, reason)
        scaling = None
        if sel.scaling and "lmshard" in sel.systems:
            from bench import scaling as scaling_mod

            scaling = scaling_mod.run(sizes, rounds, tmp)
        aio = None
        if sel.everything:  # acked puts from 64 coroutines (lmshard.aio, redis.asyncio)
            from bench import aio_puts

            aio = aio_puts.run(quick, rounds, tmp)
        changes = None
        if sel.changes and "lmshard" in sel.systems:
            from bench import change_log

            # A/B on a noisy machine: at least 3 alternations, 7 in a full run.
            changes = change_log.run(sizes, max(3, 2 * rounds + 1), tmp)
        replicas = None
        if sel.replicas and "lmshard" in sel.systems:  # local gets on a replica, acks, lag
            from bench import replicas as replicas_bench

            replicas = replicas_bench.run(quick, max(2, rounds), tmp)
        reshard = None
        if sel.reshard and "lmshard" in sel.systems:  # write pauses and put latency of a re-shard
            from bench import reshard as reshard_bench

            reshard = reshard_bench.run(quick, rounds, tmp)
        ttl = None
        if sel.everything:  # point gets on a table with ttl vs a plain one; expiry's CPU
            from bench import ttl as ttl_bench

            ttl = ttl_bench.run(quick, rounds, tmp)
    finally:
        load = monitor.result()
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "quick": quick, "rounds": rounds, "sizes": asdict(sizes),
            "machine": info, "load": load,
            "systems": {cls.key: {"label": cls.label, "durability": cls.durability}
                        for cls in ALL},
            "skipped_systems": missing,
        },
        "workloads": results.summary(),
        "floors": floors.summarize(results.floors),
        "scaling": scaling,
        "aio": aio,
        "changes": changes,
        "ttl": ttl,
        "replicas": replicas,
        "reshard": reshard,
    }
    summary["targets"] = report.targets(summary)
    if summary["floors"] is not None:
        summary["floors"]["beside"] = report.floors(summary)
    report.print_all(summary)
    if aio is not None:
        from bench import aio_puts

        aio_puts.print_summary(aio)
    if ttl is not None:
        from bench import ttl as ttl_bench

        ttl_bench.print_summary(ttl)
    if replicas is not None:
        from bench import replicas as replicas_bench

        replicas_bench.print_summary(replicas)
    if reshard is not None:
        from bench import reshard as reshard_bench

        reshard_bench.print_summary(reshard)
    if out_dir is not None:
        written = report.write(summary, out_dir, DOCS / "performance.md" if out_dir == PERF
                               else out_dir / "performance.md")
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
