"""What the results were measured on, and how busy the machine was with other work meanwhile.

``describe()`` records the machine and versions for the method section. ``LoadMonitor`` samples
/proc every few seconds while the suite runs and splits the CPU time spent on the machine into
this suite's process tree and everything else, so a run on a shared machine says so with a
number rather than a guess.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 2.0
"""How often the load monitor reads /proc."""
LOADED_SHARE = 0.25
"""Other work using more than this share of the cores on average marks the run as loaded."""
TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (fsync costs depend on it)."""
    best, fstype = "", "?"
    real = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def describe(tmp: Path) -> dict[str, Any]:
    cpu = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "filesystem": filesystem(tmp),
        "python": sys.version.split()[0],
        "packages": {name: _package(name) for name in (
            "lmshard", "lmdb", "cbor2", "msgpack", "pyzmq", "numpy", "zlmdb", "redis",
            "matplotlib")},
        "load_at_start": os.getloadavg(),
    }


def _proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process, counting the children it reaped:
    a short-lived worker's time shows up in its parent once it is gone."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        try:
            out[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / TICKS)
        except (IndexError, ValueError):
            continue
    return out


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O)."""
    fields = _read("/proc/stat").splitlines()[0].split()[1:]
    values = [int(x) for x in fields[:8]]
    return (sum(values) - values[3] - values[4]) / TICKS


class LoadMonitor:
    """Samples in a thread; ``result()`` gives average cores used by others and by the suite."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="load-monitor")
        self.others = 0.0
        self.ours = 0.0
        self.seconds = 0.0
        self.peak_others = 0.0

    def _ours(self, procs: dict[int, tuple[int, float]]) -> float:
        """CPU seconds of this process's tree so far, reaped descendants included."""
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0.0, [self.root]
        while todo:
            pid = todo.pop()
            if pid in procs:
                total += procs[pid][1]
            todo.extend(children.get(pid, ()))
        return total

    def _loop(self) -> None:
        prev_t, prev_busy = time.monotonic(), _busy_seconds()
        prev_ours = self._ours(_proc_cpu())
        stopped = False
        while not stopped:
            stopped = self._stop.wait(SAMPLE_SECONDS)
            t, busy = time.monotonic(), _busy_seconds()
            ours = self._ours(_proc_cpu())
            mine = max(0.0, ours - prev_ours)
            dt = t - prev_t
            other = max(0.0, (busy - prev_busy) - mine)
            self.others += other
            self.ours += mine
            self.seconds += dt
            self.peak_others = max(self.peak_others, other / dt)
            prev_t, prev_busy, prev_ours = t, busy, ours

    def start(self) -> LoadMonitor:
        self._thread.start()
        return self

    def result(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=10)
        cores = os.cpu_count() or 1
        s = self.seconds or 1.0
        others = self.others / s
        return {
            "seconds": round(self.seconds, 1),
            "others_cores": round(others, 2),
            "others_peak_cores": round(self.peak_others, 2),
            "suite_cores": round(self.ours / s, 2),
            "load_at_end": os.getloadavg(),
            "loaded": others > LOADED_SHARE * cores,
        }
