"""What the change log costs and how fast it reaches a watcher: log on against log off.

    python -m bench.suite --only changes [--quick]      # as in `make bench`
    python -m bench.change_log [--rounds 7] [--batch 10] [--rate 10000] [--seconds 5]

Two lmshard services run side by side for the whole measurement, alike (4 shard owners, fsync
on, map 1 GiB) but for ``[changes] enabled``: "on" writes a change-log record in every group
commit's transaction, "off" does not. Each round runs every figure on both, in an order that
reverses (A/B, then B/A) or rotates from round to round, so drift on a shared machine hits both
alike; the tables show medians over the rounds and the per-round paired ratios.

- Batched inserts through ``client.writer()`` (the suite's insert workload, one client) and
  acked single puts (one client): rows/s and the owners' CPU time per row, on vs off.
- A paced write load: one writer process per shard puts ``batch`` rows every ``batch / (rate /
  4)`` seconds with ``client.batch()`` (so each batch is one commit on one shard), each row's
  value carrying the writer's ``time.monotonic()`` at send (CLOCK_MONOTONIC: one clock for every
  process of the host). Run with the log off, with it on and no watcher, with one watcher and
  with four (``client.watch("records")``, each in its own process). A watcher's lag is the
  ``time.monotonic()`` at which ``Watch.get`` handed it the change, less the moment the writer
  had the commit's ack (and, as an upper bound, less the moment it sent the batch, which takes
  in the commit and its fsync). The owners' CPU time (every thread, ``/proc/PID/task/*/
  schedstat``) is read right before the workers are released and right after the last is done.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine, sys_lmshard
from bench.procs import Run, run_workers
from bench.schema import record
from bench.systems import Lmshard

RATE = 10_000
"""Changes per second of the paced load, all shards together."""
WATCH_BATCH = 10
"""Rows per commit of the paced load."""
PHASES: tuple[tuple[str, str, int], ...] = (
    ("log off", "off", 0), ("log on, no watcher", "on", 0), ("log on, 1 watcher", "on", 1),
    ("log on, 4 watchers", "on", 4))
"""The paced load's settings: (name, service, watchers)."""
LAG_TARGET_MS = 5.0
INSERT_TARGET = 0.9
CPU_TARGET = 1.10


def owner_cpu(pids: list[int]) -> float:
    """CPU seconds the processes (every thread) have run, from /proc schedstat (ns)."""
    return owner_cpu_split(pids)[0]


def owner_cpu_split(pids: list[int]) -> tuple[float, float]:
    """CPU seconds the processes have run: every thread, and their ZeroMQ I/O threads alone
    (libzmq names them ``ZMQbg/IO/N``), from /proc schedstat (ns)."""
    total = io = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                ns = int((task / "schedstat").read_text().split()[0])
                name = (task / "comm").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just ended
            total += ns
            if name.startswith("ZMQbg/IO"):
                io += ns
    return total / 1e9, io / 1e9


# -- workers -----------------------------------------------------------------------------------


def paced_writer(spec: dict[str, Any]) -> Run:
    """Put ``count`` new rows of shard ``shard`` in batches of ``batch``, one batch every
    ``interval`` seconds (catching up without sleeping when behind). Returns per batch the
    monotonic times of send and ack."""
    c = sys_lmshard._client(spec)
    table = c.schema.tables["records"]
    kenc, shard_of = table.key.encode, c.config.slot_map.shard_of
    keys: list[int] = []
    i = spec["base"]
    while len(keys) < spec["count"]:
        if shard_of(kenc(i)) == spec["shard"]:
            keys.append(i)
        i += 1
    rows = [record(k) for k in keys]
    batch, interval = spec["batch"], spec["interval"]
    chunks = [(keys[s:s + batch], rows[s:s + batch]) for s in range(0, len(keys), batch)]

    def run() -> tuple[int, list[int], dict[str, Any]]:
        clock, sleep = time.monotonic, time.sleep
        sent_at: list[float] = []
        acked_at: list[float] = []
        t0 = clock()
        for j, (ks, rs) in enumerate(chunks):
            ahead = t0 + j * interval - clock()
            if ahead > 0:
                sleep(ahead)
            sent = clock()
            with c.batch() as b:
                for k, r in zip(ks, rs, strict=True):
                    r["sent"] = sent
                    b.put("records", k, r)
            acked_at.append(clock())
            sent_at.append(sent)
        lat = [int((a - s) * 1e9) for s, a in zip(sent_at, acked_at, strict=True)]
        return len(keys), lat, {"keys": keys, "batch": batch, "sent": sent_at,
                                "acked": acked_at, "shard": spec["shard"]}

    return run


def watcher(spec: dict[str, Any]) -> Run:
    """Watch ``records`` from now (started before the release) until ``expect`` changes came
    or ``max_seconds`` passed; returns each change's key, shard and the time it was handed
    over."""
    c = sys_lmshard._client(spec)
    w = c.watch("records")

    def run() -> tuple[int, list[int], dict[str, Any]]:
        clock = time.monotonic
        get = w.get
        expect, deadline = spec["expect"], clock() + spec["max_seconds"]
        keys: list[int] = []
        shards: list[int] = []
        got_at: list[float] = []
        sent: list[float] = []
        while len(keys) < expect:
            left = deadline - clock()
            if left <= 0:
                break
            ch = get(min(left, 0.5))
            if ch is None:
                continue
            got_at.append(clock())
            keys.append(ch.key)
            shards.append(ch.shard)
            sent.append(ch.value["sent"])
        w.close()
        lat = [int((g - s) * 1e9) for g, s in zip(got_at, sent, strict=True)]
        return len(keys), lat, {"keys": keys, "shards": shards, "got": got_at}

    return run


# -- the parent --------------------------------------------------------------------------------


def _pct(ms: np.ndarray) -> dict[str, float | None]:
    if not len(ms):
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3),
            "max": round(float(ms.max()), 3)}


class Measure:
    def __init__(self, services: dict[str, Lmshard], specs: dict[str, dict[str, Any]]) -> None:
        self.services, self.specs = services, specs
        self.next_key = 10**10

    def keys(self, n: int) -> int:
        base = self.next_key
        self.next_key += n
        return base

    def pids(self, which: str) -> list[int]:
        return self.services[which].servers()

    def insert(self, which: str, rows: int, out: dict[str, Any]) -> None:
        spec = dict(self.specs[which], start=self.keys(rows), count=rows, batch=1000)
        s = run_workers(sys_lmshard.insert_batched, [spec],
                        probe=lambda: owner_cpu(self.pids(which)))
        before, after = s.extra["probe"]
        out.setdefault(which, []).append(s.rate)
        out.setdefault(which + "_cpu_us", []).append((after - before) / rows * 1e6)

    def puts(self, which: str, count: int, out: dict[str, Any]) -> None:
        spec = dict(self.specs[which], start=self.keys(count), count=count)
        s = run_workers(sys_lmshard.put_acked, [spec], probe=lambda: owner_cpu(self.pids(which)))
        before, after = s.extra["probe"]
        out.setdefault(which, []).append(s.rate)
        out.setdefault(which + "_cpu_us", []).append((after - before) / count * 1e6)

    def paced(self, which: str, watchers: int, seconds: float, rate: int, batch: int
              ) -> dict[str, Any]:
        shards = len(self.pids(which))
        per_writer = int(rate * seconds / shards) // batch * batch
        base = self.keys(per_writer * shards * 8)
        interval = batch / (rate / shards)
        base_spec = self.specs[which]
        fns: list[Any] = []
        specs: list[dict[str, Any]] = []
        for s in range(shards):
            fns.append(paced_writer)
            specs.append(dict(base_spec, shard=s, base=base, count=per_writer, batch=batch,
                              interval=interval))
        for _ in range(watchers):
            fns.append(watcher)
            specs.append(dict(base_spec, expect=per_writer * shards,
                              max_seconds=seconds * 3 + 10))
        s = run_workers(fns, specs, probe=lambda: owner_cpu_split(self.pids(which)))
        (before, io_before), (after, io_after) = s.extra["probe"]
        outs = s.extra["workers"]
        writers, watches = outs[:shards], outs[shards:]
        acked: dict[int, float] = {}
        sent: dict[int, float] = {}
        shard_of: dict[int, int] = {}
        for w in writers:
            b = w["batch"]
            for j, k in enumerate(w["keys"]):
                acked[k] = w["acked"][j // b]
                sent[k] = w["sent"][j // b]
                shard_of[k] = w["shard"]
        written = len(acked)
        first = min(min(w["sent"]) for w in writers)
        last = max(max(w["acked"]) for w in writers)
        from_ack: list[float] = []
        from_send: list[float] = []
        received = []
        misrouted = 0
        for w in watches:
            received.append(len(w["keys"]))
            for k, sh, g in zip(w["keys"], w["shards"], w["got"], strict=True):
                from_ack.append((g - acked[k]) * 1000)
                from_send.append((g - sent[k]) * 1000)
                misrouted += sh != shard_of[k]
        commit_ms = np.concatenate([(np.asarray(w["acked"]) - np.asarray(w["sent"])) * 1000
                                    for w in writers])
        return {"written": written, "written_per_s": written / (last - first),
                "cpu_s": after - before, "io_s": io_after - io_before, "window_s": s.seconds,
                "received": received, "misrouted": misrouted,
                "from_ack_ms": from_ack, "from_send_ms": from_send,
                "commit_ms": commit_ms.tolist()}


def run(sizes: Any, rounds: int, tmp: Path, rate: int = RATE, batch: int = WATCH_BATCH
        ) -> dict[str, Any]:
    """Every figure on both services, ``rounds`` times, alternating; medians and ratios."""
    rows, puts, seconds = sizes.log_rows, sizes.log_puts, sizes.watch_seconds
    services = {"on": Lmshard(readers=0), "off": Lmshard(readers=0, changes_enabled=False)}
    bases = []
    started = time.time()
    monitor = machine.LoadMonitor().start()
    insert: dict[str, list[float]] = {}
    put1: dict[str, list[float]] = {}
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in PHASES}
    try:
        specs = {}
        for key, svc in services.items():
            base = Path(tempfile.mkdtemp(prefix=f"changes-{key}-", dir=tmp))
            bases.append(base)
            specs[key] = svc.start(base)
        m = Measure(services, specs)
        for rnd in range(rounds):
            order = ("on", "off") if rnd % 2 == 0 else ("off", "on")
            print(f"change log, round {rnd + 1}/{rounds}", flush=True)
            for which in order:
                m.insert(which, rows, insert)
                print(f"    log {which:<4} batched inserts {insert[which][-1]:>10,.0f} rows/s, "
                      f"owners {insert[which + '_cpu_us'][-1]:6.2f} us CPU a row", flush=True)
            for which in order:
                m.puts(which, puts, put1)
                print(f"    log {which:<4} acked puts      {put1[which][-1]:>10,.0f} puts/s, "
                      f"owners {put1[which + '_cpu_us'][-1]:6.1f} us CPU a put", flush=True)
            k = rnd % len(PHASES)
            for name, which, watchers in PHASES[k:] + PHASES[:k]:
                p = m.paced(which, watchers, seconds, rate, batch)
                phases[name].append(p)
                lag = (f", lag from ack p50 {np.percentile(p['from_ack_ms'], 50):.2f} p99 "
                       f"{np.percentile(p['from_ack_ms'], 99):.2f} ms, received "
                       f"{min(p['received']):,}" if watchers else "")
                print(f"    {name:<20} {p['written_per_s']:>8,.0f} changes/s, owners "
                      f"{p['cpu_s'] / p['written'] * 1e6:6.2f} us CPU a change{lag}",
                      flush=True)
    finally:
        for svc in services.values():
            svc.stop()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
    return summarize(insert, put1, phases, rounds=rounds, rows=rows, puts=puts,
                     seconds=seconds, started=started, rate=rate, batch=batch,
                     load=monitor.result())


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [round(x / y, 3) for x, y in zip(a, b, strict=True) if y]


def summarize(insert: dict[str, list[float]], put1: dict[str, list[float]],
              phases: dict[str, list[dict[str, Any]]], **meta: Any) -> dict[str, Any]:
    def ab(d: dict[str, list[float]]) -> dict[str, Any]:
        on, off = float(np.median(d["on"])), float(np.median(d["off"]))
        return {"on": round(on, 1), "off": round(off, 1), "ratio": round(on / off, 3),
                "per_round": _paired(d["on"], d["off"]),
                "on_rates": [round(x, 1) for x in d["on"]],
                "off_rates": [round(x, 1) for x in d["off"]],
                "on_cpu_us": round(float(np.median(d["on_cpu_us"])), 2),
                "off_cpu_us": round(float(np.median(d["off_cpu_us"])), 2),
                "cpu_ratio": round(float(np.median(d["on_cpu_us"]) /
                                         np.median(d["off_cpu_us"])), 3),
                "cpu_per_round": _paired(d["on_cpu_us"], d["off_cpu_us"])}

    out_phases = {}
    for name, runs in phases.items():
        cpu_us = [r["cpu_s"] / r["written"] * 1e6 for r in runs]
        io_us = [r["io_s"] / r["written"] * 1e6 for r in runs]
        entry: dict[str, Any] = {
            "io_us_per_change": round(float(np.median(io_us)), 3),
            "io_us_rounds": [round(x, 3) for x in io_us],
            "written_per_s": round(float(np.median([r["written_per_s"] for r in runs])), 1),
            "cpu_us_per_change": round(float(np.median(cpu_us)), 3),
            "cpu_us_rounds": [round(x, 3) for x in cpu_us],
            "owner_cores": round(float(np.median([r["cpu_s"] / r["window_s"] for r in runs])),
                                 4),
            "commit_ms": _pct(np.concatenate([r["commit_ms"] for r in runs])),
        }
        if runs and runs[0]["received"]:
            entry["from_ack_ms"] = _pct(np.concatenate([r["from_ack_ms"] for r in runs]))
            entry["from_send_ms"] = _pct(np.concatenate([r["from_send_ms"] for r in runs]))
            entry["p99_from_ack_rounds"] = [round(float(np.percentile(r["from_ack_ms"], 99)), 3)
                                            for r in runs if r["from_ack_ms"]]
            entry["changes_seen"] = int(sum(sum(r["received"]) for r in runs))
            entry["changes_expected"] = int(sum(r["written"] * len(r["received"])
                                                for r in runs))
            entry["misrouted"] = int(sum(r["misrouted"] for r in runs))
        out_phases[name] = entry
    ins, put = ab(insert), ab(put1)
    none = out_phases["log on, no watcher"]
    four = out_phases["log on, 4 watchers"]
    cpu_ratio = four["cpu_us_per_change"] / none["cpu_us_per_change"]
    cpu_rounds = _paired(four["cpu_us_rounds"], none["cpu_us_rounds"])
    one = out_phases["log on, 1 watcher"]["from_ack_ms"]
    # The floor of one message per watcher per commit: no watcher's cost but the owner's
    # ZeroMQ I/O thread carrying the messages (measured in the same rounds).
    extra_io = [f - n for f, n in zip(four["io_us_rounds"], none["io_us_rounds"], strict=True)]
    floor_rounds = [round((n + x) / n, 3) for n, x in zip(none["cpu_us_rounds"], extra_io,
                                                            strict=True) if n]
    floor = float(np.median(floor_rounds)) if floor_rounds else float("nan")
    targets = [
        {"target": "batched inserts (writer), log on vs off", "goal": f">= {INSERT_TARGET}x",
         "value": f"{ins['ratio']:.2f}x", "per_round": ins["per_round"],
         "status": "PASS" if ins["ratio"] >= INSERT_TARGET else "MISS"},
        {"target": f"watch lag from ack at {meta['rate']:,} changes/s, 1 watcher, p99",
         "goal": f"<= {LAG_TARGET_MS:g} ms",
         "value": "-" if one["p99"] is None else f"{one['p99']:.2f} ms",
         "per_round": out_phases["log on, 1 watcher"]["p99_from_ack_rounds"],
         "status": "n/a" if one["p99"] is None else
         "PASS" if one["p99"] <= LAG_TARGET_MS else "MISS"},
        {"target": "owner CPU a change, 4 watchers vs none", "goal": f"<= {CPU_TARGET:.2f}x",
         "value": f"{cpu_ratio:.2f}x", "per_round": cpu_rounds,
         "status": "PASS" if cpu_ratio <= CPU_TARGET else "MISS"},
        {"target": "  its floor: the owner's extra ZeroMQ I/O-thread time alone",
         "goal": "-", "value": f"{floor:.2f}x", "per_round": floor_rounds, "status": "floor"},
    ]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta.pop("started"))),
        **meta, "insert": ins, "put1": put, "phases": out_phases, "targets": targets,
    }


def main() -> None:
    import argparse

    from bench import report

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=100_000, help="rows of one insert run")
    ap.add_argument("--puts", type=int, default=1000, help="acked puts of one run")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of one paced load")
    ap.add_argument("--rate", type=int, default=RATE, help="changes/s of the paced load")
    ap.add_argument("--batch", type=int, default=WATCH_BATCH, help="rows a commit, paced load")
    args = ap.parse_args()
    sizes = argparse.Namespace(log_rows=args.rows, log_puts=args.puts,
                               watch_seconds=args.seconds)
    tmp = Path(tempfile.mkdtemp(prefix="lmshard-changes-"))
    try:
        ch = run(sizes, args.rounds, tmp, args.rate, args.batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nChange log: {report.change_intro(ch)}\n")
    for rows in (report.change_ab_rows(ch), report.change_phase_rows(ch),
                 report.change_target_rows(ch)):
        print(report.text_table(rows) + "\n")


if __name__ == "__main__":
    main()
