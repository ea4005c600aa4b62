"""``lmshard demo``: a workload of several processes against a running service that serves
the demo schema (``lmshard.demo``): batches of users, orders and counter increments, reads of
what was written, and index lookups; then totals and rows per shard.

    lmshard demo [-c CONFIG] [--workers N] [--seconds S]
"""

from __future__ import annotations

import argparse
import random
import signal
import time
import traceback
import uuid
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import lmshard
from lmshard.config import ConfigError, load_config
from lmshard.demo import COUNTRIES, STATUSES, counters, orders, schema, users
from lmshard.ops.command import EXIT_FAILED, EXIT_OK, config_option, say

USERS_PER_BATCH = 5
"""Each demo batch writes this many users, one order each, and one counter increment."""
READS_PER_BATCH = 10
"""Point reads after each batch (users and orders written earlier by the same worker)."""
LOOKUP_EVERY = 20
"""One index lookup (a scan on every shard) every this many batches."""


@dataclass
class WorkerResult:
    """What one demo worker did."""

    worker: int
    seconds: float = 0.0
    writes: int = 0
    reads: int = 0
    lookups: int = 0
    batches: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failure: str | None = None


def run_worker(config_path: str, worker: int, seconds: float) -> WorkerResult:
    """Write and read for ``seconds``; every error is counted, none stops the worker."""
    result = WorkerResult(worker)
    rng = random.Random(worker)
    written: list[tuple[uuid.UUID, uuid.UUID]] = []
    started = time.monotonic()
    try:
        with lmshard.connect(config_path) as client:
            while time.monotonic() - started < seconds:
                try:
                    batch = [(uuid.uuid4(), uuid.uuid4()) for _ in range(USERS_PER_BATCH)]
                    with client.batch() as b:
                        for uid, oid in batch:
                            b.put(users, uid, {"name": f"user-{uid.hex[:8]}",
                                               "country": rng.choice(COUNTRIES)})
                            b.put(orders, (uid, oid), {"status": rng.choice(STATUSES),
                                                       "cents": rng.randrange(100, 100_000)})
                        b.incr(counters, f"worker-{worker}", len(batch))
                    result.batches += 1
                    result.writes += len(b)
                    written.extend(batch)
                    for uid, oid in rng.sample(written, min(READS_PER_BATCH, len(written))):
                        if client.get(users, uid) is None or client.get(orders, (uid, oid)) is None:
                            raise AssertionError(f"acked row {uid} is missing")
                        result.reads += 2
                    if result.batches % LOOKUP_EVERY == 0:
                        client.lookup(users, "by_country", rng.choice(COUNTRIES))
                        result.lookups += 1
                except (lmshard.Error, AssertionError) as exc:
                    name = type(exc).__name__
                    result.errors[name] = result.errors.get(name, 0) + 1
    except Exception:
        result.failure = traceback.format_exc()
    result.seconds = time.monotonic() - started
    return result


def _worker_main(out: Connection, config_path: str, worker: int, seconds: float) -> None:
    """A worker process: ``run_worker``, its result sent back through ``out``."""
    out.send(run_worker(config_path, worker, seconds))
    out.close()


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def run(config_path: str, workers: int = 4, seconds: float = 10.0) -> dict[str, Any]:
    """Run ``workers`` worker processes for ``seconds``; totals, and rows per shard after.

    A worker that dies (killed, out of memory, a crash in an extension) is listed under
    ``died`` and in ``failures`` with its exit code; the totals are those of the workers that
    finished, which go on to the end whatever happens to the others.
    """
    ctx = get_context("spawn")  # no ZeroMQ context or LMDB handle crosses a fork
    procs = []
    waiting: dict[Connection, int] = {}
    try:
        for w in range(workers):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(send, config_path, w, seconds),
                               name=f"lmshard-demo-{w}")
            proc.start()
            send.close()  # the worker holds the only write end: its death reads as EOF here
            procs.append(proc)
            waiting[receive] = w
        by_worker: dict[int, WorkerResult] = {}
        while waiting:
            for ready in wait(list(waiting)):
                receive = cast(Connection, ready)
                w = waiting.pop(receive)
                try:
                    by_worker[w] = receive.recv()
                except EOFError:
                    pass  # it died before it could send its result
                receive.close()
    finally:
        for proc in procs:
            if proc.exitcode is None and waiting:  # interrupted: leave no worker behind
                proc.terminate()
            proc.join()
    results = [by_worker[w] for w in sorted(by_worker)]
    died = [{"worker": w, "pid": proc.pid, "exitcode": proc.exitcode}
            for w, proc in enumerate(procs) if w not in by_worker]
    errors: dict[str, int] = {}
    for r in results:
        for name, n in r.errors.items():
            errors[name] = errors.get(name, 0) + n
    elapsed = max((r.seconds for r in results), default=seconds) or seconds
    with lmshard.connect(config_path) as client:
        stats = client.stats()["shards"]
    rows = {s: ({t: info["rows"] for t, info in st["tables"].items()} if "tables" in st
                else {"error": st.get("error", "?")}) for s, st in stats.items()}
    return {
        "workers": workers,
        "finished": len(results),
        "died": died,
        "seconds": elapsed,
        "writes": sum(r.writes for r in results),
        "reads": sum(r.reads for r in results),
        "lookups": sum(r.lookups for r in results),
        "batches": sum(r.batches for r in results),
        "errors": errors,
        "failures": [f"worker {r.worker} failed:\n{r.failure}" for r in results if r.failure]
        + [f"worker {d['worker']} (pid {d['pid']}) died: {_exit_text(d['exitcode'])}; "
           "its work is not in the totals" for d in died],
        "rows": rows,
    }


def report(summary: dict[str, Any]) -> str:
    """``run``'s summary as the text ``lmshard demo`` prints after its header line (the
    command prints that one before the run: workers, seconds, config, shards)."""
    s = summary
    secs = s["seconds"]
    finished = s.get("finished", s["workers"])
    lines = [
        f"  seconds  {secs:>9.1f}",
        f"  workers  {finished:>9}"
        + (f"  of {s['workers']}: the totals are those of the {finished} that finished"
           if finished != s["workers"] else ""),
        f"  writes   {s['writes']:>9}  {s['writes'] / secs:>9.0f}/s",
        f"  reads    {s['reads']:>9}  {s['reads'] / secs:>9.0f}/s",
        f"  batches  {s['batches']:>9}  {s['batches'] / secs:>9.0f}/s",
        f"  lookups  {s['lookups']:>9}",
        f"  errors   {sum(s['errors'].values()):>9}"
        + ("  " + ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items()))
           if s["errors"] else ""),
    ]
    tables = sorted({t for r in s["rows"].values() for t in r if t != "error"})
    lines.append("  rows per shard:")
    lines.append("    shard " + "".join(f"{t:>10}" for t in tables))
    for shard, counts in sorted(s["rows"].items()):
        if "error" in counts:
            lines.append(f"    {shard:>5}  {counts['error']}")
        else:
            lines.append(f"    {shard:>5} " + "".join(f"{counts.get(t, 0):>10}" for t in tables))
    for failure in s["failures"]:
        lines.append("  " + failure)
    if s["failures"]:
        died = len(s.get("died", ()))
        failed = len(s["failures"]) - died
        what = [f"{n} of {s['workers']} workers {verb}"
                for n, verb in ((died, "died"), (failed, "failed")) if n]
        lines.append(f"demo failed: {', '.join(what)}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """``lmshard demo``: the workload against a service that serves the demo schema."""
    config = load_config(args.config)
    if config.load_schema() is not schema:
        raise ConfigError(f"the service serves schema {config.schema!r}; the demo writes the "
                          "tables of lmshard.demo:schema", key="schema", file=config.path,
                          hint="run the demo against a service with schema = "
                          '"lmshard.demo:schema", e.g. `make run`')
    say(f"demo: {args.workers} workers for {args.seconds:g} s against {config.path} "
        f"({config.shards} shards)")
    summary = run(str(config.path), workers=args.workers, seconds=args.seconds)
    say(report(summary))
    return EXIT_FAILED if summary["failures"] else EXIT_OK


def add_parsers(subparsers: Any) -> None:
    """Register ``demo [-c CONFIG] [--workers N] [--seconds S]`` on the ``lmshard`` CLI."""
    p = subparsers.add_parser("demo", parents=[config_option()],
                              help="run a demo workload against the running service")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    p.set_defaults(func=cmd_demo)
