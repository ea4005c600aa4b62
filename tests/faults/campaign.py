"""A history under a nemesis: a real service (supervisord, owners, readers, monitor), client
processes recording every operation, faults injected at random moments, then the checks.

One history: ``lmshard init`` + ``up`` in a fresh directory, ``workers`` client processes for
``seconds``, a nemesis thread injecting one fault of ``kinds`` every 0.3-1.5 s, then every
fault healed, the service left to settle, a final read of every key and counter, the unique
index checked, and ``lmshard down``. The history goes to ``checker.check``; counters to
``checker.check_counter``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmshard
from tests.cluster import REPO, lmshard_cli
from tests.faults import checker
from tests.faults.disk import Ballast, MountNotPermitted, mount_small_tmpfs
from tests.faults.history import OK, Op, load
from tests.faults.schema import counters, rows
from tests.faults.workload import COUNTERS, GROUPS, NAMES, TIMEOUT_MS, register, run_worker

PAUSE_SECONDS = TIMEOUT_MS * 3 / 1000
"""A SIGSTOPped process stays stopped longer than a client's timeout and retry."""

FAULT_KINDS = ("kill-owner", "pause-owner", "kill-reader", "pause-reader", "kill-monitor",
               "pause-monitor", "kill-client", "restart-supervisord", "disk-full")
CHANGES_RETAIN = "4MiB"
"""Each shard's change-log bound in the campaign's services (three fit the tmpfs below)."""
DATA_FS_SIZE = 64 * 2**20
"""The tmpfs the data directory lives on when the disk-full fault is on."""
DISK_FULL_SECONDS = 1.5
"""How long a filled filesystem stays full."""
LOW_FDS = 64
"""Every third client runs with this few open files allowed (sockets, LMDB, its history)."""


@dataclass
class Summary:
    seed: int
    seconds: float
    operations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    """Keys whose search ran out of its budget: neither passed nor failed."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Resource samples over the run (``sample_every``): time, owner RSS and fds, slots."""
    checked_in: float = 0.0
    """Seconds from the end of the load to the verdict (faults healed, final reads, backup,
    the history loaded and checked)."""

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": self.seconds, "operations": self.operations,
                "outcomes": dict(self.outcomes), "faults": dict(self.faults),
                "anomalies": self.anomalies, "undecided": self.undecided}


class Service:
    """A service of the campaign's schema in ``base`` (sockets in a short ``run_dir``)."""

    def __init__(self, base: Path, run_dir: Path, shards: int = 3) -> None:
        self.data_dir = base / "var" / "data"
        done = lmshard_cli("init", str(base), "--shards", str(shards), "--readers", "2",
                           "--schema", "tests.faults.schema:schema", "--python-path", str(REPO),
                           "--run-dir", str(run_dir), "--monitor-http", "127.0.0.1:0")
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)
        self.toml = base / "lmshard.toml"
        # The data may live on a small tmpfs (the disk-full fault): keep each shard's change
        # log to a few MiB, or the logs alone would fill it under a long load.
        text = self.toml.read_text()
        assert 'retain = "64MiB"' in text, "lmshard init wrote no default [changes] retain"
        self.toml.write_text(text.replace('retain = "64MiB"', f'retain = "{CHANGES_RETAIN}"'))

    def up(self) -> None:
        done = lmshard_cli("up", "-c", str(self.toml))
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)

    def down(self) -> None:
        lmshard_cli("down", "-c", str(self.toml))

    def restart(self) -> bool:
        """supervisord stopped (TERM: it stops every process cleanly) and started again."""
        self.down()
        for _ in range(3):  # a client may hold a socket name for a moment: try again
            if lmshard_cli("up", "-c", str(self.toml)).returncode == 0:
                return True
            time.sleep(0.5)
        raise RuntimeError("lmshard up failed three times after a restart")

    def processes(self) -> dict[str, int]:
        """supervisord's RUNNING processes of the service: name -> pid."""
        done = lmshard_cli("status", "--json", "-c", str(self.toml))
        status = json.loads(done.stdout)
        return {p["name"]: p["pid"] for p in status["processes"]
                if p["state"] == "RUNNING" and p["pid"]}

    def healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while lmshard_cli("status", "-c", str(self.toml)).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not come back after the faults")
            time.sleep(0.2)


class Clients:
    """The client processes; a killed one is replaced by a new process with a new name."""

    def __init__(self, toml: Path, out: Path, seconds: float, rng: random.Random) -> None:
        self.toml, self.out, self.rng = toml, out, rng
        self.deadline = time.monotonic() + seconds
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self.started = 0

    def start(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0.5:
            return
        name = f"c{self.started}"
        self.started += 1
        p = self.ctx.Process(target=run_worker, args=(
            str(self.toml), name, str(self.out / f"{name}.jsonl"), left,
            self.rng.randrange(2**32), LOW_FDS if self.started % 3 == 0 else None))
        p.start()
        self.procs.append(p)

    def kill_one(self) -> bool:
        alive = [p for p in self.procs if p.is_alive()]
        if not alive:
            return False
        victim = self.rng.choice(alive)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        self.start()
        return True

    def join(self) -> None:
        for p in self.procs:
            p.join(max(1.0, self.deadline - time.monotonic() + 60))
            if p.is_alive():
                p.kill()


class Nemesis(threading.Thread):
    """Injects one fault of ``kinds`` every 0.3-1.5 s until stopped; heals paused processes."""

    def __init__(self, service: Service, clients: Clients, kinds: tuple[str, ...],
                 rng: random.Random, interval: tuple[float, float] = (0.3, 1.5)) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.service, self.clients, self.kinds, self.rng = service, clients, kinds, rng
        self.interval = interval
        self.stop = threading.Event()
        self.small_fs = False
        """The data directory is on a small filesystem of its own (disk-full possible)."""
        self.faults: Counter[str] = Counter()
        self.paused: list[int] = []

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.interval)):
            kind = self.rng.choice(self.kinds)
            if self.inject(kind):
                self.faults[kind] += 1

    def inject(self, kind: str) -> bool:
        if kind == "kill-client":
            return self.clients.kill_one()
        if kind == "disk-full":
            if not self.small_fs:
                return False
            with Ballast() as ballast:  # released when the block ends
                ballast.fill(self.service.data_dir)
                self.stop.wait(DISK_FULL_SECONDS)
            return True
        if kind == "restart-supervisord":
            return self.service.restart()
        prefix = {"owner": "lmshard:shard_", "reader": "lmshard:reader_",
                  "monitor": "lmshard:monitor"}[kind.split("-", 1)[1]]
        try:
            pids = [pid for name, pid in self.service.processes().items()
                    if name.startswith(prefix)]
        except (ValueError, subprocess.SubprocessError):
            return False
        if not pids:
            return False
        pid = self.rng.choice(pids)
        try:
            if kind.startswith("pause-"):
                os.kill(pid, signal.SIGSTOP)
                self.paused.append(pid)
                self.stop.wait(PAUSE_SECONDS)
                os.kill(pid, signal.SIGCONT)
                self.paused.remove(pid)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def heal(self) -> None:
        self.stop.set()
        self.join(30)
        for pid in self.paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def through_backup(toml: Path, out: Path, last: list[Op], totals: dict[str, int]) -> list[str]:
    """A consistent backup of the quiet service, verified, restored and read back: it must
    hold exactly what the final reads saw (every register, every counter)."""
    from tests.faults.backup_check import backup_restore_rows

    got = backup_restore_rows(toml, out)
    problems = []
    for op in last:
        group, name = op.key.split("/")
        row = got.rows.get(("rows", (group, name)))
        value = None if row is None else row["v"]
        if value != op.output:
            problems.append(f"backup: {op.key} holds {value!r}, the service {op.output!r}")
    for key, total in totals.items():
        value = got.rows.get(("counters", key.split("/", 1)[1]), 0)
        if value != total:
            problems.append(f"backup: {key} holds {value!r}, the service {total!r}")
    return problems


def final_reads(toml: Path) -> tuple[list[Op], dict[str, int], list[str]]:
    """Every register read once more after the faults (as ok reads at the end of the
    history), every counter's value, and what is wrong with the unique index."""
    ops: list[Op] = []
    problems: list[str] = []
    with lmshard.connect(toml) as c:
        for g in GROUPS:
            for n in NAMES:
                start = time.monotonic()
                got = c.get(rows, (g, n))
                ops.append(Op("final", register(g, n), "read", None, OK,
                              None if got is None else got["v"], start, time.monotonic()))
            claims = [v for k, v in c.scan(rows, prefix=(g,)) if k[1].startswith("claim-")]
            emails = Counter(v["email"] for v in claims)
            problems += [f"group {g}: email {e} claimed by {n} rows" for e, n in emails.items()
                         if n > 1]
            for e in emails:
                found = c.lookup(rows, "by_email", e)
                if len([k for k, _ in found if k[0] == g]) != 1:
                    problems.append(f"group {g}: index by_email {e} holds {found!r:.200}")
        totals = {f"counter/{k}": int(c.get(counters, k) or 0) for k in COUNTERS}
    return ops, totals, problems


def _small_fs(stack: contextlib.ExitStack, data_dir: Path) -> bool:
    """Mount a small tmpfs on the data directory (unmounted by ``stack``); False where mounts
    are not permitted (the disk-full fault is then left out)."""
    try:
        stack.enter_context(mount_small_tmpfs(data_dir, DATA_FS_SIZE))
    except MountNotPermitted:
        return False
    return True


def sample(service: Service) -> dict[str, Any]:
    """The owners' RSS and anonymous RSS (KiB) and open fds, each shard's reader slots held,
    and the size of the data files (KiB), now. RSS counts the pages of the data files an
    owner has mapped (shared memory where they live on a tmpfs), so it grows with the data;
    the anonymous part (heap, stacks) is where an owner's leak would show."""
    done = lmshard_cli("status", "--json", "-c", str(service.toml))
    procs = json.loads(done.stdout)["processes"]
    owners = [p for p in procs if "shard" in p and p["pid"]]
    rss, anon, fds = 0, 0, 0
    for p in owners:
        try:
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{p['pid']}/status").read_text().splitlines()
                          if ":" in line)
            rss += int(status["VmRSS"].split()[0])
            anon += int(status["RssAnon"].split()[0])
            fds += len(os.listdir(f"/proc/{p['pid']}/fd"))
        except (OSError, KeyError):
            pass
    slots = sum((p.get("health") or {}).get("readers", 0) for p in owners)
    data = sum(f.stat().st_size for f in service.data_dir.rglob("data.mdb")) // 1024
    return {"t": time.monotonic(), "owners": len(owners), "rss_kib": rss, "anon_kib": anon,
            "fds": fds, "reader_slots": slots, "data_kib": data}


def _sampling(service: Service, every: float | None, samples: list[dict[str, Any]],
              stop: threading.Event) -> threading.Thread | None:
    if every is None:
        return None

    def run() -> None:
        while not stop.wait(every):
            try:
                samples.append(sample(service))
            except (ValueError, KeyError, subprocess.SubprocessError):
                pass  # the service was restarting: no sample this time

    t = threading.Thread(target=run, name="sampler", daemon=True)
    t.start()
    return t


def run_history(seconds: float, kinds: tuple[str, ...] = FAULT_KINDS, workers: int = 4,
                seed: int | None = None, keep: Path | None = None,
                interval: tuple[float, float] = (0.3, 1.5),
                sample_every: float | None = None) -> Summary:
    """One history; its summary (``anomalies`` empty when every check passed). ``interval``:
    seconds between faults (drawn uniformly); ``sample_every``: take resource samples."""
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="lmsf-"))
    summary = Summary(seed, seconds)
    service = Service(base / "svc", base / "run")
    stack = contextlib.ExitStack()
    try:
        small_fs = "disk-full" in kinds and _small_fs(stack, service.data_dir)
        service.up()
        out = base / "history"
        out.mkdir()
        clients = Clients(service.toml, out, seconds, rng)
        for _ in range(workers):
            clients.start()
        nemesis = Nemesis(service, clients, kinds, rng, interval)
        nemesis.small_fs = small_fs
        nemesis.start()
        sampling_done = threading.Event()
        sampler = _sampling(service, sample_every, summary.samples, sampling_done)
        time.sleep(seconds)
        loaded = time.monotonic()
        nemesis.heal()
        clients.join()
        service.healthy()
        sampling_done.set()
        if sampler is not None:
            sampler.join(30)
            summary.samples.append(sample(service))
        ops = load(sorted(out.glob("*.jsonl")))
        last, totals, problems = final_reads(service.toml)
        problems += through_backup(service.toml, base / "backup", last, totals)
        ops += last
        result = checker.check(ops)
        summary.operations = len(ops)
        summary.outcomes = Counter(op.outcome for op in ops)
        summary.faults = nemesis.faults
        summary.anomalies = result.anomalies + problems
        summary.undecided = result.undecided
        for key, final in totals.items():
            summary.anomalies += checker.check_counter(
                key, [op for op in ops if op.key == key], final)
        summary.checked_in = time.monotonic() - loaded
        return summary
    finally:
        service.down()
        stack.close()
        if keep is not None:
            shutil.copytree(base, keep / f"history-{seed}", dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)
