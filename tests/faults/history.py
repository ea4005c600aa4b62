"""Histories of operations, as the fault campaign's clients record them.

Every operation is recorded twice: when it is invoked and when it completes, with the time of
each (``time.monotonic()``, one clock for every process on the host) and its outcome:

- ``ok``: the store answered; for a write, it is committed.
- ``fail``: the store answered with an error that guarantees nothing was applied (a unique
  violation, a refused batch, ``StoreFull``).
- ``unknown``: no answer (a timeout, ``ShardUnavailable``, the client was killed): the
  operation may or may not have taken effect, at any time after its invocation.
- ``maybe``: taken effect before it completed, or never (a writer stream whose refused batches
  are not named op by op: each op of it was answered, applied or refused).

Each client process appends to a file of its own, one JSON line per event, flushed as it goes,
so a client SIGKILLed mid-operation leaves its invocations behind; ``load`` merges the files
and turns an invocation without a completion into ``unknown``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

OK, FAIL, UNKNOWN, MAYBE = "ok", "fail", "unknown", "maybe"
OUTCOMES = (OK, FAIL, UNKNOWN, MAYBE)

KINDS = ("write", "read", "cas", "incr", "delete")
"""write(value); read() -> value; cas((expected, new)) -> applied?; incr(delta) -> new value;
delete() (a write of None)."""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a history, on one key (a long history holds millions: slots, and
    ``load`` shares the strings every op repeats)."""

    process: str
    key: str
    kind: str
    value: Any
    """What was asked: the value written, (expected, new) for cas, the delta for incr."""
    outcome: str
    output: Any
    """What came back: the value read, whether a cas applied, an increment's new value."""
    start: float
    end: float
    """math.inf for an unknown outcome: it may take effect any time after ``start``."""
    batch: str | None = None
    """The batch it was part of (ops of one batch are applied together or not at all)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")


class Recorder:
    """Appends one process's events to ``path`` (JSON lines), flushed per event."""

    def __init__(self, path: str | os.PathLike[str], process: str) -> None:
        self.process = process
        self._file = open(path, "a", buffering=1)  # line-buffered: a kill loses no line
        self._next = 0

    def invoke(self, key: str, kind: str, value: Any = None, batch: str | None = None) -> int:
        """Record an invocation; the id to complete it with."""
        self._next += 1
        self._write({"e": "invoke", "id": self._next, "p": self.process, "key": key,
                     "kind": kind, "value": value, "batch": batch, "t": time.monotonic()})
        return self._next

    def complete(self, op_id: int, outcome: str, output: Any = None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._write({"e": "complete", "id": op_id, "p": self.process, "outcome": outcome,
                     "output": output, "t": time.monotonic()})

    def _write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tuple(v: Any) -> Any:
    """JSON gives lists back; cas values are pairs."""
    return tuple(v) if isinstance(v, list) else v


def load(paths: Iterable[str | os.PathLike[str]]) -> list[Op]:
    """Every operation recorded in ``paths``, ordered by invocation time."""
    ops: list[Op] = []
    for path in paths:
        pending: dict[tuple[str, int], dict[str, Any]] = {}
        with open(path) as lines:  # line by line: a long history's files are large
            for line in lines:
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half line of a process killed while writing it
                if ev["e"] == "invoke":
                    pending[(ev["p"], ev["id"])] = ev
                    continue
                inv = pending.pop((ev["p"], ev["id"]))
                ops.append(_op(inv, ev["outcome"], ev["output"], ev["t"]))
        ops.extend(_op(inv, UNKNOWN, None, math.inf) for inv in pending.values())
    ops.sort(key=lambda op: op.start)
    return ops


def _op(inv: dict[str, Any], outcome: str, output: Any, end: float) -> Op:
    return Op(process=sys.intern(inv["p"]), key=sys.intern(inv["key"]),
              kind=sys.intern(inv["kind"]), value=_tuple(inv["value"]),
              outcome=sys.intern(outcome), output=output, start=inv["t"],
              end=math.inf if outcome == UNKNOWN else end, batch=inv.get("batch"))
