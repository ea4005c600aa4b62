"""What an online re-shard costs the clients of a running service: write pauses, put latency.

    python -m bench.suite --only reshard [--quick]      # as in `make bench`
    python -m bench.reshard [--rounds 3] [--quick] [--markdown]

A real service under supervisord (``lmshard init`` + ``lmshard up``): 4 shard owners, fsync on,
the change log on, filled through ``client.writer()`` with the suite's ~100-byte record until
the ``records`` table holds about 1 GiB of LMDB pages (``--quick``: 64 MiB). One client process
then does acked single puts (``client.put``, new keys over every slot) in a loop, recording the
start and the latency of each, through everything below. Each round runs
``lmshard reshard --shards 8`` (grow: half the rows move, 4 moves) and then
``lmshard reshard --shards 4`` (shrink: they move back); before each, the client's puts run
alone for about as long as the last re-shard of that direction took (the baseline window).

- Write pause per move: the reshard command's own figure (``move 3/4 done: writes to slots
  640-767 paused 42.8 ms``), from the freeze of the slots on the source to the source's record
  of the switch. p50/p99/max over the moves of all rounds. Target p99 <= 50 ms.
- Client put latency during the re-shard (from the command's start to its exit) against the
  baseline window right before it (of the same length when the baseline ran that long):
  p50/p99/max and the ratio of each (reported).
- The re-shard's total time, and rows (and MiB: rows times the table's bytes per row) moved
  per second (reported).
- The floor of the pause: a pause is at least three fsynced ``slot_state`` records (the
  source's freeze, the destination's and the source's switch), each a write transaction of its
  own on its owner, committed and fsynced before it answers. Measured on the same service
  while the client's puts run, right after each re-shard: three records of an unchanged state
  on shard 0 through ``lmshard.resharding.admin.OwnerAdmin``, 20 times; the median and p99 of
  the three. The pause above that floor is mostly the command's own: one save of its state
  file (timed likewise: a ``save_state`` call in the same run directory), the log replayed
  while frozen, its round trips.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine, sys_lmshard
from bench.procs import context, run_workers
from bench.report import md_table
from bench.systems import REPO

SHARDS = 4
GROWN = 8
PAUSE_TARGET_MS = 50.0
FILL_BYTES = {True: 64 << 20, False: 1 << 30}
"""LMDB bytes of the ``records`` table to fill before the re-shards (quick, full)."""
FILL_CHUNK = 250_000
"""Rows per filling worker (each builds its rows in memory first)."""
FLOOR_TIMES = 20
"""Times the three-record floor is measured after each re-shard."""
MIN_BASELINE_S = 3.0
MAX_BASELINE_S = 180.0
KEY_BASE = 10**10
"""The put client's keys start here (the fill's are below)."""
COPY_VS_FILL = 5.0
"""The first baseline's length is a guess: a re-shard moves rows about this many times slower
than the fill writes them (a copy and a drop per row, each page a commit of its own; measured
on a 2-core machine)."""

PAUSE_LINE = re.compile(r"move (\d+)/(\d+) done: writes to slots (\S+) paused ([\d.]+) ms")
COPY_LINE = re.compile(r"^\s*copy: (\d+) of (\d+)\s*$")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def lmshard_cli(toml: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    """``lmshard ARGS -c CONFIG`` in a new process, as an operator runs it (output captured)."""
    done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", *args, "-c", str(toml)],
                          capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"lmshard {' '.join(args)} exited with {done.returncode}:\n"
                           f"{done.stdout}{done.stderr}")
    return done


class SupervisedService:
    """A service made by ``lmshard init`` and run by ``lmshard up`` (supervisord), as re-sharding
    needs: adding and removing shards starts and stops owners under supervisord."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.toml = base / "lmshard.toml"
        self.up = False

    def start(self) -> dict[str, Any]:
        from lmshard.ops import cli

        # ipc socket paths hold at most 107 bytes: the run directory gets a short path.
        self.run_dir = Path(tempfile.mkdtemp(prefix="lms-rs-"))
        if cli.main(["init", str(self.base), "--shards", str(SHARDS), "--readers", "0",
                     "--schema", "bench.schema:schema", "--python-path", str(REPO),
                     "--run-dir", str(self.run_dir), "--monitor-http", "127.0.0.1:0",
                     "--no-alerts"]) != 0:
            raise RuntimeError(f"lmshard init {self.base} failed")
        self.up = True
        lmshard_cli(self.toml, "up", timeout=180)
        return {"config": str(self.toml)}

    def config(self) -> Any:
        from lmshard.config import load_config

        return load_config(self.toml)

    def stop(self) -> None:
        if self.up:
            try:
                lmshard_cli(self.toml, "down", timeout=120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"reshard bench: lmshard down: {exc}", file=sys.stderr)
            self.up = False
        shutil.rmtree(getattr(self, "run_dir", ""), ignore_errors=True)


def table_size(config: Any) -> tuple[int, int]:
    """Rows and LMDB bytes (pages times page size) of the ``records`` table over every shard."""
    from lmshard.store import Store

    rows = size = 0
    schema = config.load_schema()
    for n in range(config.shards):
        st = Store(config.shard_dir(n), schema, readonly=True)
        try:
            with st.read() as r:
                s = r.txn.stat(r.tables["records"].db)
                rows += s["entries"]
                size += s["psize"] * (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"])
        finally:
            st.close()
    return rows, size


def put_loop(config: str, start: int, stop: Any, ready: Any, out: str) -> None:
    """The client: acked single puts of new keys from ``start`` on until ``stop`` is set;
    saves each put's start (``time.monotonic()``, s) and latency (ns) to ``out`` (.npy)."""
    import lmshard
    from bench.schema import record

    c = lmshard.connect(config)
    for s in range(c.shards):
        c.ping(s)
    put = c.put
    t0s: list[float] = []
    lats: list[int] = []
    now, clock = time.monotonic, time.perf_counter_ns
    i = start
    ready.set()
    while not stop.is_set():
        r = record(i)
        t = now()
        a = clock()
        put("records", i, r)
        lats.append(clock() - a)
        t0s.append(t)
        i += 1
    np.save(out, np.array([t0s, lats], dtype=np.float64))
    c.close()


class PutClient:
    """``put_loop`` in a worker process."""

    def __init__(self, config: str, out: Path) -> None:
        ctx = context()
        self.stop_ev, self.ready = ctx.Event(), ctx.Event()
        self.out = out
        self.proc = ctx.Process(target=put_loop, args=(config, KEY_BASE, self.stop_ev,
                                                       self.ready, str(out)), daemon=True)

    def start(self) -> None:
        self.proc.start()
        if not self.ready.wait(120):
            raise RuntimeError("the put client did not connect within 120 s")

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Stop it; each put's start (monotonic s) and latency (ms)."""
        self.stop_ev.set()
        self.proc.join(120)
        if self.proc.exitcode != 0:
            raise RuntimeError(f"the put client exited with {self.proc.exitcode}")
        t, lat = np.load(self.out)
        return t, lat / 1e6


def floor_ms(toml: Path, times: int = FLOOR_TIMES) -> list[float]:
    """``times`` timings (ms) of three ``slot_state`` records of shard 0's unchanged state:
    each commits a write transaction of its own and fsyncs it before the owner answers."""
    from lmshard.config import load_config
    from lmshard.resharding.admin import OwnerAdmin

    out = []
    with OwnerAdmin(load_config(toml), owner_wait=0) as admin:
        state, _ = admin.state(0)
        admin.record(0, state)  # connected, warm
        for _ in range(times):
            t = time.perf_counter()
            for _ in range(3):
                admin.record(0, state)
            out.append((time.perf_counter() - t) * 1000)
    return out


def state_saves_ms(toml: Path, times: int = FLOOR_TIMES) -> list[float]:
    """``times`` timings (ms) of a save of a re-shard's state file (written, fsynced, renamed
    into place and its directory fsynced) in the service's run directory: the command saves it
    once inside a pause (the switch phase, with the position the frozen replay reached)."""
    from lmshard.config import load_config
    from lmshard.resharding.run import plan
    from lmshard.resharding.state import save_state

    config = load_config(toml)
    other = GROWN if config.shards == SHARDS else SHARDS
    state = plan(config, config.slot_map, shards=other, move=None, to=None)
    path = config.run_dir / "bench-reshard-state.json"  # not the command's reshard.json
    out = []
    try:
        save_state(path, state)
        for _ in range(times):
            t = time.perf_counter()
            save_state(path, state)
            out.append((time.perf_counter() - t) * 1000)
    finally:
        path.unlink(missing_ok=True)
    return out


def lat_stats(lat: np.ndarray, seconds: float) -> dict[str, float]:
    """Percentiles (ms) of put latencies ``lat``, their count and rate over ``seconds``."""
    if len(lat) == 0:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "puts": 0,
                "per_s": 0}
    return {"p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2), "puts": int(len(lat)),
            "per_s": round(len(lat) / seconds) if seconds > 0 else 0}


def reshard_once(svc: SupervisedService, shards: int, baseline_s: float) -> dict[str, Any]:
    """Let the puts run alone for ``baseline_s``, then ``lmshard reshard --shards SHARDS``; the
    command's figures, its output lines with the time each came (s into the re-shard), and
    the windows (monotonic s) of the baseline and the re-shard."""
    b0 = time.monotonic()
    time.sleep(baseline_s)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lmshard.ops.cli", "reshard", "--shards",
                             str(shards), "-c", str(svc.toml)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            env=dict(_env(), PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    lines = [(round(time.monotonic() - t0, 3), line.rstrip()) for line in proc.stdout]
    proc.wait()
    t1 = time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(f"lmshard reshard --shards {shards} exited with {proc.returncode}:\n"
                           + "\n".join(line for _, line in lines))
    pauses, copied = [], 0
    for _, line in lines:
        if m := PAUSE_LINE.search(line):
            pauses.append(float(m.group(4)))
        elif m := COPY_LINE.match(line):
            copied += int(m.group(2))
    if not pauses:
        raise RuntimeError("lmshard reshard printed no write pause:\n"
                           + "\n".join(line for _, line in lines))
    return {"shards": shards, "baseline_from": b0, "start": t0, "end": t1,
            "seconds": t1 - t0, "pauses_ms": pauses, "rows_moved": copied, "lines": lines}


def slowest_put(r: dict[str, Any], t: np.ndarray, lat: np.ndarray) -> dict[str, Any]:
    """The slowest put during re-shard ``r``: its latency, when it started (s into the
    re-shard) and the command's last output line before it (what the re-shard was doing)."""
    inside = np.flatnonzero((t >= r["start"]) & (t < r["end"]))
    if len(inside) == 0:
        return {}
    i = inside[np.argmax(lat[inside])]
    at = float(t[i]) - r["start"]
    before = [line.strip() for s, line in r["lines"] if s <= at and line.strip()]
    after = before[-1] if before else ""
    return {"ms": round(float(lat[i]), 1), "at_s": round(at, 2),
            "after": after if len(after) <= 70 else after[:67] + "..."}


def run(quick: bool, rounds: int, tmp: Path) -> dict[str, Any]:
    started, load_at_start = time.time(), os.getloadavg()[0]
    monitor = machine.LoadMonitor().start()
    base = Path(tempfile.mkdtemp(prefix="reshard-", dir=tmp))
    svc = SupervisedService(base / "svc")
    client: PutClient | None = None
    runs: list[dict[str, Any]] = []
    floors: dict[str, list[float]] = {"grow": [], "shrink": []}
    saves: dict[str, list[float]] = {"grow": [], "shrink": []}
    try:
        spec = svc.start()
        target = FILL_BYTES[quick]
        rows = size = 0
        fill_s = 0.0
        while size < target:
            s = run_workers(sys_lmshard.insert_batched,
                            [dict(spec, start=rows, count=FILL_CHUNK, batch=1000)])
            fill_s += s.seconds
            rows, size = table_size(svc.config())
            print(f"reshard: filled {rows:,} rows, {size / 2**20:,.0f} MiB "
                  f"({rows / fill_s:,.0f} rows/s)", flush=True)
        row_bytes = size / rows
        client = PutClient(spec["config"], base / "puts.npy")
        client.start()
        # The first baseline's length: a guess from the fill rate; later ones: the last
        # re-shard of the same direction took.
        last = {GROWN: rows / 2 / (rows / fill_s) * COPY_VS_FILL, SHARDS: 0.0}
        for rnd in range(rounds):
            for shards, what in ((GROWN, "grow"), (SHARDS, "shrink")):
                print(f"reshard, round {rnd + 1}/{rounds}: {what} to {shards} shards", flush=True)
                baseline = min(MAX_BASELINE_S, max(MIN_BASELINE_S, last[shards]
                                                   or last[GROWN]))
                r = reshard_once(svc, shards, baseline)
                r["what"] = what
                last[shards] = r["seconds"]
                fl = floor_ms(svc.toml)
                floors[what].extend(fl)
                saves[what].extend(state_saves_ms(svc.toml))
                runs.append(r)
                print(f"    {r['seconds']:.1f} s, {r['rows_moved']:,} rows moved, pauses "
                      f"{', '.join(f'{p:.1f}' for p in r['pauses_ms'])} ms; three slot_state "
                      f"records: median {np.median(fl):.1f} ms; one state file save: median "
                      f"{np.median(saves[what][-FLOOR_TIMES:]):.1f} ms", flush=True)
        t, lat = client.finish()
        client = None
    finally:
        if client is not None:
            client.stop_ev.set()
            client.proc.join(30)
            if client.proc.is_alive():
                client.proc.kill()
        svc.stop()
        shutil.rmtree(base, ignore_errors=True)
    out: dict[str, Any] = {"started": started, "rounds": rounds, "quick": quick,
                           "rows": rows, "mib": round(size / 2**20, 1),
                           "row_bytes": round(row_bytes, 1),
                           "fill_rows_per_s": round(rows / fill_s),
                           "load": monitor.result(), "load_at_start": load_at_start}
    for what in ("grow", "shrink"):
        mine = [r for r in runs if r["what"] == what]
        during, before = [], []
        windows = []
        for r in mine:
            span = r["end"] - r["start"]
            b_from = max(r["baseline_from"], r["start"] - span)
            during.append(lat[(t >= r["start"]) & (t < r["end"])])
            before.append(lat[(t >= b_from) & (t < r["start"])])
            windows.append(r["start"] - b_from)
        d = lat_stats(np.concatenate(during), sum(r["seconds"] for r in mine))
        b = lat_stats(np.concatenate(before), sum(windows))
        pauses = [p for r in mine for p in r["pauses_ms"]]
        slow = max((slowest_put(r, t, lat) for r in mine), key=lambda x: x.get("ms", 0))
        fl = floors[what]
        secs = float(np.median([r["seconds"] for r in mine]))
        moved = int(np.median([r["rows_moved"] for r in mine]))
        out[what] = {
            "moves": len(pauses),
            "pause_ms": {"p50": round(float(np.percentile(pauses, 50)), 2),
                         "p99": round(float(np.percentile(pauses, 99)), 2),
                         "max": round(max(pauses), 2)},
            "pauses_ms": [round(p, 2) for p in pauses],
            "floor_ms": {"p50": round(float(np.median(fl)), 2),
                         "p99": round(float(np.percentile(fl, 99)), 2), "times": len(fl)},
            "state_saves_ms": {"p50": round(float(np.median(saves[what])), 2),
                               "p99": round(float(np.percentile(saves[what], 99)), 2)},
            "pause_over_floor": round(float(np.percentile(pauses, 50)) / float(np.median(fl)),
                                      1),
            "puts_during_ms": d, "puts_before_ms": b,
            "put_ratio": {k: round(d[k] / b[k], 2) if b[k] else None
                          for k in ("p50", "p99", "max", "per_s")},
            "baseline_s": [round(w, 1) for w in windows],
            "seconds": [round(r["seconds"], 1) for r in mine],
            "rows_moved": moved, "slowest_put": slow,
            "rows_per_s": round(moved / secs),
            "mib_per_s": round(moved * row_bytes / 2**20 / secs, 1),
        }
    return out


def print_summary(r: dict[str, Any]) -> None:
    quick = "; QUICK" if r["quick"] else ""
    print(f"\nRe-sharding ({r['rounds']} round(s); {r['rows']:,} rows, {r['mib']:,} MiB in "
          f"{SHARDS} shards, fsync on; one client's acked puts throughout{quick})")
    for what, label in (("grow", f"{SHARDS} -> {GROWN}"), ("shrink", f"{GROWN} -> {SHARDS}")):
        g = r[what]
        p, f, d, b, q = (g["pause_ms"], g["floor_ms"], g["puts_during_ms"],
                         g["puts_before_ms"], g["put_ratio"])
        ok = "PASS" if p["p99"] <= PAUSE_TARGET_MS else "MISS"
        print(f"  {label} shards: {g['moves']} moves, {g['seconds']} s, {g['rows_moved']:,} rows "
              f"moved, {g['rows_per_s']:,} rows/s ({g['mib_per_s']} MiB/s; reported)")
        print(f"    write pause per move: p50 {p['p50']} ms, p99 {p['p99']} ms, max {p['max']} ms "
              f"(target p99 <= {PAUSE_TARGET_MS:.0f} ms: {ok})")
        print(f"    its floor, three fsynced slot_state records: median {f['p50']} ms, p99 "
              f"{f['p99']} ms ({f['times']} times); the median pause is "
              f"{g['pause_over_floor']}x that")
        v = g["state_saves_ms"]
        print(f"    the command's save of its state file in a pause: median {v['p50']} ms, "
              f"p99 {v['p99']} ms")
        print(f"    client puts during: p50 {d['p50']} ms, p99 {d['p99']} ms, max {d['max']} ms, "
              f"{d['per_s']:,}/s ({d['puts']:,} puts in {g['seconds']} s)")
        print(f"    client puts before: p50 {b['p50']} ms, p99 {b['p99']} ms, max {b['max']} ms, "
              f"{b['per_s']:,}/s ({b['puts']:,} puts in {g['baseline_s']} s)")
        if sp := g.get("slowest_put"):
            print(f"    the slowest put during: {sp['ms']} ms, {sp['at_s']} s into the re-shard, "
                  f"after the line {sp['after']!r}")
        print(f"    during / before: p50 {q['p50']}x, p99 {q['p99']}x, max {q['max']}x, puts/s "
              f"{q['per_s']}x (reported)")


def _ms(d: dict[str, Any]) -> str:
    return f"p50 {d['p50']} ms, p99 {d['p99']} ms, max {d['max']} ms"


def markdown(r: dict[str, Any], when: str) -> list[str]:
    """The Re-sharding section of docs/performance.md (bench/report.py writes it from the
    suite's results; ``when`` says the date and the machine's load)."""
    g, s = r["grow"], r["shrink"]

    def both(fn: Any) -> list[str]:
        return [fn(g), fn(s)]

    rows = [
        ["figure", f"{SHARDS} -> {GROWN} shards", f"{GROWN} -> {SHARDS} shards"],
        ["moves (all rounds)", *both(lambda x: str(x["moves"]))],
        ["time of the re-shard (per round)", *both(lambda x: ", ".join(f"{t} s" for t in
                                                                        x["seconds"]))],
        ["rows moved (median of the rounds)", *both(
            lambda x: f"{x['rows_moved']:,} ({x['rows_moved'] * r['row_bytes'] / 2**20:,.0f} "
            "MiB)")],
        ["rows moved per second (reported)", *both(
            lambda x: f"{x['rows_per_s']:,}/s ({x['mib_per_s']} MiB/s)")],
        [f"**write pause per move** (target p99 <= {PAUSE_TARGET_MS:.0f} ms)", *both(
            lambda x: f"{_ms(x['pause_ms'])}: "
            f"{'PASS' if x['pause_ms']['p99'] <= PAUSE_TARGET_MS else 'MISS'}")],
        ["its floor: three fsynced `slot_state` records on one owner", *both(
            lambda x: f"median {x['floor_ms']['p50']} ms, p99 {x['floor_ms']['p99']} ms "
            f"({x['floor_ms']['times']} times); median pause {x['pause_over_floor']}x that")],
        ["the command's save of its state file in a pause", *both(
            lambda x: f"median {x['state_saves_ms']['p50']} ms, p99 "
            f"{x['state_saves_ms']['p99']} ms")],
        ["client puts before (baseline window)", *both(
            lambda x: f"{_ms(x['puts_before_ms'])}; {x['puts_before_ms']['per_s']:,} puts/s "
            f"over {sum(x['baseline_s']):.1f} s")],
        ["client puts during the re-shard", *both(
            lambda x: f"{_ms(x['puts_during_ms'])}; {x['puts_during_ms']['per_s']:,} puts/s")],
        ["the slowest put during: when, and the command's last line before it", *both(
            lambda x: (f"{x['slowest_put']['ms']} ms, {x['slowest_put']['at_s']} s in, after "
                       f"`{x['slowest_put']['after']}`") if x.get("slowest_put") else "")],
        ["during / before (reported)", *both(
            lambda x: f"p50 {x['put_ratio']['p50']}x, p99 {x['put_ratio']['p99']}x, max "
            f"{x['put_ratio']['max']}x, puts/s {x['put_ratio']['per_s']}x")],
    ]
    lines = ["## Re-sharding (bench/reshard.py)", ""]
    notes = []
    if r["quick"]:
        notes.append("**Quick run** (`--quick`, 64 MiB): to be replaced by a full run "
                     "(`python -m bench.reshard`, 1 GiB).")
    if r["load"]["loaded"]:
        notes.append("**Measured on a loaded machine**: pauses and put latencies are higher "
                     "and noisier than on a quiet one.")
    if notes:
        lines += ["> " + " ".join(notes), ""]
    lines += [
        "`python -m bench.suite --only reshard` (and `make bench`): a service under supervisord "
        f"(`lmshard init` + `lmshard up`), {SHARDS} owners with fsync on, the `records` table "
        f"filled through `client.writer()` to {r['rows']:,} rows of the suite's record "
        f"({r['mib']:,} MiB of LMDB pages, {r['row_bytes']} bytes a row); then "
        f"`lmshard reshard --shards {GROWN}` (half the rows move, {GROWN - SHARDS} moves) and "
        f"`lmshard reshard --shards {SHARDS}` (they move back), {r['rounds']} round(s), while "
        "one client process does acked single puts of new keys (`client.put`) throughout. "
        "The baseline is the same client's puts in the window right before each re-shard, as "
        "long as the last re-shard of that direction took (the first one's length is a "
        f"guess). {when}.",
        "",
        md_table(rows),
        "",
        "The write pause is the reshard command's own figure per move, from the freeze of the "
        "slots on the source to the source's record of the switch; only writes to the slots of "
        f"that move ({1024 // GROWN} of 1,024 here) wait in it. Its floor is what the design "
        "cannot go below: the three `slot_state` records of a pause (the source's freeze, the "
        "destination's and the source's switch) each commit a write transaction and fsync it "
        "before the owner answers; timed here as three records of an unchanged state on shard "
        "0 through `lmshard.resharding.admin.OwnerAdmin`, right after each re-shard with the "
        "client's puts running. The rest of a pause is the command's: one save of its state "
        "file (`<run_dir>/reshard.json`, written, fsynced, renamed and its directory "
        "fsynced: the switch phase, with where the frozen replay got to; timed the same "
        "way in the same run directory), the change log replayed while frozen (when writes "
        "to the moving slots came in after the last catch-up round, as the client's do "
        "here, one more commit with fsync, on the destination) and four reads of the two "
        "shards' slot states.",
        "",
        "The client's puts during a re-shard share the owners with the copy (`move_rows` "
        "batches of up to 1,000 rows into the destination, each a commit with fsync) and the "
        "drop on the source. A put meets a pause only when its key is in the moving slots "
        "while they are frozen: with one client doing one put at a time, a few puts per "
        "re-shard at most. So the puts' p99 and their lower rate during a re-shard are the "
        "copy's load on the owners, not the pauses.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", action="store_true",
                    help="print docs/performance.md's Re-sharding section afterwards too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reshard-") as tmp:
        r = run(args.quick, 1 if args.quick else args.rounds, Path(tmp))
    print_summary(r)
    if args.markdown:
        from bench.report import load_line

        meta = {"load": r["load"], "machine": {"cores": os.cpu_count() or 1,
                                               "load_at_start": [r["load_at_start"]]}}
        when = time.strftime("%Y-%m-%d", time.gmtime(r["started"]))
        print("\n" + "\n".join(markdown(r, f"{when}; {load_line(meta)}")))


if __name__ == "__main__":
    main()
