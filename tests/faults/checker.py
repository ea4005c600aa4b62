"""Is a recorded history one the store was allowed to produce?

Per key, linearizability of a register (read, write, delete, compare-and-set, increment), with
the search of Wing and Gong as Lowe improved it and Porcupine implements it: walk the call and
return events in time order, linearize an operation at its call if the model allows it,
remember each (set of linearized operations, state) reached so no state is explored twice,
and backtrack when a return is reached whose operation is not linearized yet. A key's
operations are independent of other keys' (the store is linearizable per key), so each key is
checked alone, which keeps the search small; and a key's history is cut where its state is
known (``chunks``) and searched one chunk at a time, so a long history costs in proportion to
its length.

What the outcomes allow (see ``history``): an ``ok`` operation took effect at one instant
between its invocation and its completion; a ``fail`` one never did (a value only a failed
write wrote must never be read: that is how a partly visible failed batch shows up); an
``unknown`` one either took effect at one instant after its invocation or never (its
completion is at infinity, so the search may also place it after everything else).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.history import FAIL, MAYBE, OK, UNKNOWN, Op

SEARCH_BUDGET = 3_000_000
"""Steps one key's search may take before it is reported undecided (never as passed)."""


@dataclass
class KeyResult:
    key: str
    ok: bool | None
    """None: the search ran out of its budget without a verdict."""
    ops: int
    detail: str = ""


@dataclass
class Result:
    """The verdict on a history: every key linearizable, and the anomalies found if not."""

    keys: list[KeyResult] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.anomalies

    @property
    def ops(self) -> int:
        return sum(k.ops for k in self.keys)


def step(state: Any, op: Op) -> tuple[bool, Any]:
    """The register model: is ``op`` allowed in ``state``, and the state after it."""
    kind = op.kind
    if kind == "write":
        return True, op.value
    if kind == "delete":
        return True, None
    if kind == "read":
        return op.output == state, state
    if kind == "incr":
        new = (state or 0) + op.value
        return (op.outcome == UNKNOWN or op.output == new), new
    if kind == "cas":
        expected, new = op.value
        applies = state == expected
        if op.outcome in (UNKNOWN, MAYBE):
            return True, new if applies else state
        return op.output == applies, new if applies else state
    raise ValueError(f"unknown op kind {kind!r}")


class _Entry:
    __slots__ = ("op", "index", "call", "match", "prev", "next")

    def __init__(self, op: Op | None, index: int, call: bool) -> None:
        self.op = op
        self.index = index
        self.call = call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _entries(ops: list[Op]) -> _Entry:
    """The events of ``ops`` as a doubly linked list in time order (a call before a return at
    the same instant: touching operations count as concurrent); its head sentinel."""
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.start, 0, i))
        events.append((op.end, 1, i))
    events.sort()
    head = _Entry(None, -1, False)
    calls: dict[int, _Entry] = {}
    last = head
    for _t, kind, i in events:
        e = _Entry(ops[i], i, kind == 0)
        if kind == 0:
            calls[i] = e
        else:
            e.match = calls[i]
            calls[i].match = e
        last.next, e.prev, last = e, last, e
    return head


def _lift(e: _Entry) -> None:
    """Take a call and its return out of the list."""
    for x in (e, e.match):
        assert x is not None and x.prev is not None
        x.prev.next = x.next
        if x.next is not None:
            x.next.prev = x.prev


def _unlift(e: _Entry) -> None:
    for x in (e.match, e):
        assert x is not None and x.prev is not None
        x.prev.next = x
        if x.next is not None:
            x.next.prev = x


LATE_WRITE_SECONDS = 5.0
"""How long after its invocation an unknown operation is taken to land at the latest, if it
lands: several times the longest a campaign request can wait unanswered (a client's timeout
and retry, an owner paused past them, a disk full for a while); a request the owner never got
(an owner killed, a client killed before sending) never lands."""


READ_BEFORE_CAS = 1.0
"""Seconds before a cas its expected value was read at the latest (the campaign reads it just
before)."""


def relevant(ops: list[Op]) -> list[Op]:
    """The operations that can change a verdict, so the search stays small after a fault that
    leaves many writes unknown:

    - failed ones never happened, and unknown reads say nothing;
    - an unknown (or maybe) write or cas whose value nobody observed (no read returned it, no
      cas expected it) may be taken as never applied, since values are unique: wherever it
      was linearized, no read could tell;
    - but a cas that did not apply tells that the register changed since its read, which such
      an unseen write may explain: a refused cas with an unseen write that may have landed
      between its read and its end is not checked (a weaker check, never a false anomaly).
    """
    observed = {op.output for op in ops if op.kind == "read" and op.outcome == OK}
    observed |= {op.value[0] for op in ops if op.kind == "cas"}

    def unseen(op: Op) -> bool:
        if op.outcome not in (UNKNOWN, MAYBE) or op.kind not in ("write", "cas"):
            return False
        return (op.value if op.kind == "write" else op.value[1]) not in observed

    landing = sorted((op.start, _lands_by(op)) for op in ops if unseen(op))
    longest = max((by - start for start, by in landing), default=0.0)
    out = []
    for op in ops:
        if op.outcome == FAIL or (op.kind == "read" and op.outcome == UNKNOWN) or unseen(op):
            continue
        if (op.kind == "cas" and op.outcome == OK and op.output is False
                and _may_land_within(landing, longest, op.start - READ_BEFORE_CAS, op.end)):
            continue
        out.append(op)
    return out


def _lands_by(op: Op) -> float:
    return op.end if op.outcome == MAYBE else op.start + LATE_WRITE_SECONDS


def _may_land_within(landing: list[tuple[float, float]], longest: float, lo: float,
                     hi: float) -> bool:
    """Whether one of the sorted (start, lands by) windows, none longer than ``longest``,
    overlaps [lo, hi]: only those starting in [lo - longest, hi) can."""
    first = bisect.bisect_left(landing, (lo - longest, -math.inf))
    last = bisect.bisect_left(landing, (hi, -math.inf))
    return any(by > lo for _start, by in landing[first:last])


def outcomes(state: Any, op: Op) -> list[Any]:
    """The states ``op`` may leave the register in from ``state`` (none: not allowed here).
    An unknown write or cas may also have never taken effect."""
    allowed, new = step(state, op)
    if not allowed:
        return []
    if op.outcome in (UNKNOWN, MAYBE) and op.kind in ("write", "delete", "cas") and new != state:
        return [new, state]
    return [new]


def check_register(key: str, ops: list[Op], initial: Any = None,
                   budget: int = SEARCH_BUDGET) -> KeyResult:
    """Linearizability of one key's operations (see ``relevant`` for what is left out), one
    chunk at a time (see ``chunks``), each from the state the one before ends in; ``budget``
    is each chunk's.

    An unknown operation lands within LATE_WRITE_SECONDS of its invocation or never (an
    ``outcomes`` choice), so it is not left open until the end of the history, where every
    unknown write of the run would be concurrent with every other."""
    ops = [op if op.outcome != UNKNOWN else
           dataclasses.replace(op, end=op.start + LATE_WRITE_SECONDS) for op in relevant(ops)]
    state = initial
    for chunk in chunks(ops):
        ok, detail = _search(chunk, state, budget)
        if ok is None:
            return KeyResult(key, None, len(ops), f"the search ran out of its budget {detail}")
        if not ok:
            return KeyResult(key, False, len(ops), f"no order explains {detail}")
        state = fixed_state(chunk[-1])
    return KeyResult(key, True, len(ops))


def chunks(ops: list[Op]) -> list[list[Op]]:
    """``ops`` (unknown ones already closed at LATE_WRITE_SECONDS) cut where the register's
    state is known: after an operation that fixes it (``fixed_state``) and is alone in time,
    every other operation of the key completing before it is invoked or invoked after it
    completes, strictly (operations that touch count as concurrent).

    Why a history is linearizable if and only if each chunk is, from the state the chunk
    before ends in (what ``check_register`` checks):

    - Every operation the search sees takes effect at one instant of its window
      [invocation, completion], or, if its outcome is unknown or maybe, never. The last
      operation X of a chunk is alone in time: every other window of the chunk closes before
      X's opens, every window after the chunk opens after X's closes. So in any
      linearization of the whole, the chunk's operations come first, X last among them, then
      the rest; and X, answered ``ok``, did take effect. X fixes the state: a write leaves
      its value, a delete nothing, an applied cas its new value, a read the value it
      returned. So every linearization of the whole passes through that one state right
      after X, whatever order the chunk's other operations took: the whole is linearizable
      if and only if the chunk is (ending in that state, which the search checks as it
      linearizes X last) and the rest is, from that state.
    - A quiescent point alone (nothing open across it) would not do: the state there is any
      one of those the operations before may leave (concurrent writes, an unknown write that
      landed or did not), and carrying one of them, the first the search found, would report
      an anomaly the store did not commit; carrying them all needs an exhaustive search of
      the operations before (exponential in the writes concurrent there). A cut after an
      operation that fixes the state needs neither.
    - No window may stay open across a cut. An unknown operation may, as far as the store's
      answer tells, take effect any time after its invocation; taken so, its window never
      closes and nothing after its invocation could be alone in time. The checker already
      takes an unknown operation to land within LATE_WRITE_SECONDS of its invocation or
      never, so its window is closed there before the cuts are sought, and no cut comes
      sooner than that after it: a cut relies on nothing the unchunked search did not.
    - The operations left out (``relevant``) are left out of the whole key's history before
      it is cut, with what was observed anywhere in it, exactly as without chunks.

    So chunks change what the search costs (its memory of visited states: a bit per
    operation of a chunk instead of one per operation of the whole history, and a failed
    branch is never backtracked into earlier chunks), never its verdict."""
    out: list[list[Op]] = [[]]
    ordered = sorted(ops, key=lambda o: o.start)
    closes = -math.inf  # the latest completion of the operations before ``op``
    for i, op in enumerate(ordered):
        alone = (op.start > closes
                 and (i + 1 == len(ordered) or ordered[i + 1].start > op.end))
        out[-1].append(op)
        closes = max(closes, op.end)
        if alone and fixed_state(op) is not _UNFIXED:
            out.append([])
    return [c for c in out if c]


_UNFIXED = object()


def fixed_state(op: Op) -> Any:
    """The state an ``ok`` write, delete, applied cas or read leaves the register in,
    whatever it held; ``_UNFIXED`` for any other operation."""
    if op.outcome != OK:
        return _UNFIXED
    if op.kind == "write":
        return op.value
    if op.kind == "delete":
        return None
    if op.kind == "read":
        return op.output
    if op.kind == "cas" and op.output is True:
        return op.value[1]
    return _UNFIXED


def _search(ops: list[Op], initial: Any, budget: int) -> tuple[bool | None, str]:
    """Whether some order of ``ops`` from ``initial`` explains them (None: the search ran
    out of ``budget`` steps), and the operation none explains if not."""
    head = _entries(ops)
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Entry, Any, int]] = []
    linearized = 0
    state = initial
    deepest = (0, "")
    entry = head.next
    tried = 0  # options of ``entry`` already tried
    while head.next is not None:
        assert entry is not None
        budget -= 1
        if budget < 0:
            return None, f"in {len(ops)} operations from {ops[0].start:.6f}"
        if entry.call:
            assert entry.op is not None
            bit = 1 << entry.index
            options = outcomes(state, entry.op)
            while tried < len(options):
                new = options[tried]
                tried += 1
                if (linearized | bit, new) not in cache:
                    cache.add((linearized | bit, new))
                    stack.append((entry, state, tried))
                    state, linearized = new, linearized | bit
                    _lift(entry)
                    entry, tried = head.next, 0
                    break
            else:
                entry, tried = entry.next, 0
            continue
        if len(stack) >= deepest[0]:
            deepest = (len(stack), _describe(entry.op, state))
        if not stack:
            return False, deepest[1]
        entry, state, tried = stack.pop()
        linearized &= ~(1 << entry.index)
        _unlift(entry)
    return True, ""


def _describe(op: Op | None, state: Any) -> str:
    if op is None:
        return "?"
    return (f"{op.kind}({op.value!r}) -> {op.outcome} {op.output!r} by {op.process} in "
            f"[{op.start:.6f}, {op.end:.6f}], the register holding {state!r} at best")


def check_counter(key: str, ops: list[Op], final: int) -> list[str]:
    """A counter's final value is the sum of its acked increments plus some of the unknown
    ones (all deltas positive): anything else lost an increment or applied one twice."""
    incrs = [op for op in ops if op.kind == "incr"]
    acked = sum(op.value for op in incrs if op.outcome == OK)
    unknown = sum(op.value for op in incrs if op.outcome == UNKNOWN)
    if not acked <= final <= acked + unknown:
        return [f"counter {key}: final value {final}, acked increments {acked}, unknown ones "
                f"{unknown}: expected {acked} to {acked + unknown}"]
    return []


def check_increments(key: str, ops: list[Op]) -> KeyResult:
    """A counter's increments, without a search (unknown increments commute, so a search over
    them is exponential): each acked increment's new value counts every increment acked
    before it began and no more than those invoked before it ended, and no two acked
    increments return one value (deltas are positive). The sums are prefix sums over the
    increments sorted by end (acked) and by start (all), so a long history is checked in
    n log n, not n squared."""
    incrs = [op for op in ops if op.kind == "incr" and op.outcome != FAIL]
    acked = [op for op in incrs if op.outcome == OK]
    acked_before = _Sums((op.end, op.value) for op in acked)
    invoked_before = _Sums((op.start, op.value) for op in incrs)
    problems = []
    seen: dict[Any, Op] = {}
    for op in acked:
        low = op.value + acked_before.below(op.start)
        # every increment invoked before it ended, itself aside (it is counted once, above)
        high = op.value + invoked_before.below(op.end) - (op.value if op.start < op.end else 0)
        if not low <= op.output <= high:
            problems.append(f"incr by {op.process} returned {op.output}, expected {low} to "
                            f"{high}")
        if op.output in seen:
            problems.append(f"two increments returned {op.output}")
        seen[op.output] = op
    reads = [op for op in ops if op.kind == "read" and op.outcome == OK]
    for r in reads:
        low = acked_before.below(r.start)
        high = invoked_before.below(r.end)
        if not low <= (r.output or 0) <= high:
            problems.append(f"read returned {r.output}, expected {low} to {high}")
    return KeyResult(key, not problems, len(incrs) + len(reads), "; ".join(problems[:3]))


class _Sums:
    """The sum of the values of (time, value) pairs whose time is strictly below a bound."""

    def __init__(self, pairs: Iterable[tuple[float, int]]) -> None:
        ordered = sorted(pairs, key=lambda p: p[0])
        self.times = [t for t, _ in ordered]
        self.prefix = [0]
        for _, v in ordered:
            self.prefix.append(self.prefix[-1] + v)

    def below(self, bound: float) -> int:
        return self.prefix[bisect.bisect_left(self.times, bound)]


def check(ops: Iterable[Op], initial: dict[str, Any] | None = None) -> Result:
    """Every key's history: a register's by search, a counter's by bounds (keys absent from
    ``initial`` start empty)."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    result = Result()
    for key in sorted(by_key):
        key_ops = by_key[key]
        if any(op.kind == "incr" for op in key_ops):
            r = check_increments(key, key_ops)
        else:
            r = check_register(key, key_ops, (initial or {}).get(key))
        result.keys.append(r)
        if r.ok is None:
            result.undecided.append(f"key {key}: {r.detail} ({r.ops} operations)")
        elif not r.ok:
            result.anomalies.append(f"key {key}: {r.detail}")
    return result
