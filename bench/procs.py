"""Worker processes for the suite: start, let each set up, release them together, collect.

A workload function runs in a fresh worker: ``fn(spec)`` opens what it needs (untimed) and
returns ``run``; once every worker is ready they are released at the same moment and each calls
``run() -> (ops, latencies_ns)``. Workers come from a forkserver that has the common modules
imported, so a worker starts in tens of milliseconds and holds no LMDB environment or ZeroMQ
context from its parent (neither may cross a fork).

Memory is each process's peak resident set (``VmHWM``); the servers' peaks are reset before the
workers are released (``/proc/PID/clear_refs``), so each workload reports its own.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRELOAD = ["cbor2", "lmdb", "numpy", "zmq", "msgpack", "lmshard", "lmshard.client",
           "lmshard.store", "bench.schema", "bench.procs"]
"""Modules the forkserver imports once; zlmdb and redis are left to the workers that use them."""
READY_TIMEOUT = 120.0
"""Seconds a worker may take to set up (open, connect, warm up)."""
RUN_TIMEOUT = 900.0
"""Seconds a workload may run before the suite gives up on it."""

_ctx: Any = None


def context() -> Any:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


Run = Callable[[], tuple[Any, ...]]
Workload = Callable[[dict[str, Any]], Run]


@dataclass
class Sample:
    """One workload run by one system: ops over the span all workers ran, latencies, memory."""

    ops: int
    seconds: float
    latencies_ns: np.ndarray
    client_rss_kb: int
    server_rss_kb: int | None
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def vm_hwm_kb(pid: int | str = "self") -> int:
    """Peak resident set size of a process, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pid: int) -> None:
    """Start a new peak RSS measurement for ``pid`` (a process we own)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child(fn: Workload, spec: dict[str, Any], index: int, go: Any, q: Any) -> None:
    try:
        run = fn(spec)
        q.put(("ready", index, None))
        go.wait()
        t0 = time.perf_counter()
        out = run()
        t1 = time.perf_counter()
        ops, lat = out[0], out[1]
        extra = out[2] if len(out) > 2 else None
        q.put(("done", index, (ops, t0, t1, np.asarray(lat, dtype=np.int64), vm_hwm_kb(),
                               extra)))
    except BaseException:  # noqa: B036 - reported to the parent, which raises
        q.put(("error", index, traceback.format_exc()))


class WorkerError(RuntimeError):
    pass


def run_workers(fn: Workload | Sequence[Workload], specs: Sequence[dict[str, Any]],
                servers: Iterable[int] = (), probe: Callable[[], Any] | None = None) -> Sample:
    """Run ``fn`` in one worker per spec, released together; ``servers`` are the pids whose
    peak RSS this workload reports (summed). ``fn`` may be one function per spec. ``probe``
    is called right before the workers are released and right after the last one is done;
    the two readings are ``Sample.extra["probe"]``."""
    ctx = context()
    go, q = ctx.Event(), ctx.Queue()
    fns = list(fn) if isinstance(fn, Sequence) else [fn] * len(specs)
    procs = [ctx.Process(target=_child, args=(f, s, i, go, q), daemon=True)
             for i, (f, s) in enumerate(zip(fns, specs, strict=True))]
    for p in procs:
        p.start()
    servers = list(servers)
    name = ", ".join(sorted({f"{f.__module__}.{f.__name__}" for f in fns}))

    def receive(timeout: float, finished: set[int]) -> tuple[str, int, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, i, payload = q.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None
                        and i not in finished]
                if dead:
                    raise WorkerError(f"worker {dead[0]} of {name} exited with "
                                      f"{procs[dead[0]].exitcode} without a word") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"{name}: no word from the workers in {timeout:.0f} s"
                                      ) from None
                continue
            if kind == "error":
                raise WorkerError(f"worker {i} of {name}:\n{payload}")
            return kind, i, payload

    try:
        ready: set[int] = set()
        while len(ready) < len(procs):
            ready.add(receive(READY_TIMEOUT, set())[1])
        for pid in servers:
            reset_hwm(pid)
        before = probe() if probe is not None else None
        go.set()
        done: dict[int, tuple[int, float, float, np.ndarray, int, Any]] = {}
        while len(done) < len(procs):
            _, i, payload = receive(RUN_TIMEOUT, set(done))
            done[i] = payload
        after = probe() if probe is not None else None
        server_rss = sum(vm_hwm_kb(pid) for pid in servers) if servers else None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    results = list(done.values())
    ops = sum(d[0] for d in results)
    span = max(d[2] for d in results) - min(d[1] for d in results)
    lat = np.concatenate([d[3] for d in results])
    extra: dict[str, Any] = {"workers": [done[i][5] for i in sorted(done)]}
    if probe is not None:
        extra["probe"] = (before, after)
    return Sample(ops=ops, seconds=span, latencies_ns=lat,
                  client_rss_kb=max(d[4] for d in results), server_rss_kb=server_rss,
                  workers=len(procs), extra=extra)


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` (start, count) ranges covering ``range(total)``."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, n))
        start += n
    return out

