"""A client process of the fault campaign: random operations on a few keys, each recorded.

Values are unique (``process:seq``), so a read names the write it saw. Errors that guarantee
nothing was applied (a unique violation, a full store) are ``fail``; any other error or no
answer is ``unknown``: the write may have been applied, or may be applied later (a request
queued to a paused owner), never twice.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

import lmshard
from lmshard.errors import StoreFull, UniqueViolation
from tests.faults.history import FAIL, MAYBE, OK, UNKNOWN, Recorder
from tests.faults.schema import counters, rows

GROUPS = ("g0", "g1", "g2", "g3", "g4", "g5")
"""Register groups (rows of a group share a shard)."""
NAMES = ("r0", "r1", "r2")
"""Registers per group: few, so operations on one key overlap often."""
COUNTERS = ("c0", "c1", "c2")
EMAILS = 200
"""Emails a batch may claim: the first claim of each succeeds, later ones fail the batch."""
TIMEOUT_MS = 300
"""The campaign's clients give up soon, so faults turn into unknown outcomes often."""
RETRIES = 1

_UNREAD = object()
"""A read that got no answer."""

FAILS = (UniqueViolation, StoreFull)
"""Errors after which nothing of the request was applied."""


def register(group: str, name: str) -> str:
    return f"{group}/{name}"


def row(group: str, value: str | None) -> dict[str, Any] | None:
    return None if value is None else {"group": group, "v": value, "email": None}


def outcome_of(exc: BaseException) -> str:
    return FAIL if isinstance(exc, FAILS) else UNKNOWN


class Worker:
    """One client process's loop; ``seconds`` of random operations."""

    def __init__(self, config: str, name: str, out: Path, seed: int) -> None:
        self.client = lmshard.connect(config, timeout_ms=TIMEOUT_MS, retries=RETRIES)
        self.rec = Recorder(out, name)
        self.name = name
        self.rng = random.Random(seed)
        self.seq = 0

    def value(self) -> str:
        self.seq += 1
        return f"{self.name}:{self.seq}"

    def run(self, seconds: float) -> None:
        ops = (self.write, self.read, self.read, self.cas, self.incr, self.batch, self.stream)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.rng.choice(ops)()

    def _call(self, key: str, kind: str, value: Any, fn: Any, *args: Any,
              batch: str | None = None) -> Any:
        op = self.rec.invoke(key, kind, value, batch)
        try:
            result = fn(*args)
        except lmshard.Error as exc:
            self.rec.complete(op, outcome_of(exc))
            return None
        self.rec.complete(op, OK, result if kind in ("cas", "incr") else None)
        return result

    def write(self) -> None:
        g, n = self.rng.choice(GROUPS), self.rng.choice(NAMES)
        v = self.value()
        self._call(register(g, n), "write", v, self.client.put, rows, (g, n), row(g, v))

    def read(self) -> None:
        self._read(self.rng.choice(GROUPS), self.rng.choice(NAMES))

    def _read(self, g: str, n: str) -> Any:
        op = self.rec.invoke(register(g, n), "read")
        try:
            got = self.client.get(rows, (g, n))
        except lmshard.Error:
            self.rec.complete(op, UNKNOWN)
            return _UNREAD
        value = None if got is None else got["v"]
        self.rec.complete(op, OK, value)
        return value

    def cas(self) -> None:
        g, n = self.rng.choice(GROUPS), self.rng.choice(NAMES)
        expected = self._read(g, n)  # a read like any other, recorded
        if expected is _UNREAD:
            return
        v = self.value()
        self._call(register(g, n), "cas", (expected, v), self.client.cas, rows, (g, n),
                   row(g, v), row(g, expected))

    def incr(self) -> None:
        c = self.rng.choice(COUNTERS)
        self._call(f"counter/{c}", "incr", 1, self.client.incr, counters, c, 1)

    def batch(self) -> None:
        """Two registers of one group and an email claim in one batch: one shard, atomic."""
        g = self.rng.choice(GROUPS)
        names = self.rng.sample(NAMES, 2)
        values = [self.value() for _ in names]
        claim = {"group": g, "v": self.value(), "email": f"e{self.rng.randrange(EMAILS)}"}
        batch_id = uuid.uuid4().hex
        ids = [self.rec.invoke(register(g, n), "write", v, batch_id)
               for n, v in zip(names, values, strict=True)]
        try:
            with self.client.batch() as b:
                for n, v in zip(names, values, strict=True):
                    b.put(rows, (g, n), row(g, v))
                b.put(rows, (g, f"claim-{claim['v']}"), claim)
        except lmshard.Error as exc:
            outcome = outcome_of(exc)
        else:
            outcome = OK
        for op in ids:
            self.rec.complete(op, outcome)

    def stream(self) -> None:
        """A pipelined writer stream of register writes, acked together at its end (a client
        killed mid-stream leaves them all unknown)."""
        batch_size = self.rng.choice((1, 4, 16))
        writes = [(self.rng.choice(GROUPS), self.rng.choice(NAMES), self.value())
                  for _ in range(self.rng.randrange(4, 40))]
        ids = []
        refused = False
        try:
            with self.client.writer(batch_size=batch_size, window=2) as w:
                for g, n, v in writes:
                    ids.append(self.rec.invoke(register(g, n), "write", v))
                    try:
                        w.put(rows, (g, n), row(g, v))
                    except lmshard.BatchesFailed:
                        refused = True  # an earlier batch was refused: the stream goes on
                try:
                    w.flush()  # every batch answered: applied or refused, none in flight
                except lmshard.BatchesFailed:
                    refused = True
        except lmshard.Error:
            outcome = UNKNOWN  # batches in flight when it broke may still land
        else:
            # Refused batches are named per shard, not per op: each op of a stream with one
            # was applied before the stream ended, or never.
            outcome = MAYBE if refused else OK
        for op in ids:
            self.rec.complete(op, outcome)

    def close(self) -> None:
        self.rec.close()
        self.client.close()


def run_worker(config: str, name: str, out: str, seconds: float, seed: int,
               max_fds: int | None = None) -> None:
    """Entry point of a spawned client process; ``max_fds`` lowers its open-file limit."""
    if max_fds is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))
    w = Worker(config, name, Path(out), seed)
    try:
        w.run(seconds)
    finally:
        w.close()
