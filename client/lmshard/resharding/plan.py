"""Which slots a re-shard moves where: a list of moves, each from one shard to another.

Growing from N to M shards gives each new shard an equal share of the slots (``slots // M``,
one more for the first ``slots % M`` shards), taken from the old shards that hold the most
above their share, the highest slots of each first: from 4 to 8 even shards, shard i gives the
upper half of its slots to shard i + 4. Shrinking to M shards spreads the slots of shards M and
above over the remaining ones, each time to the one furthest below its share. ``--move FIRST-
LAST --to N`` moves that slot range (one move per shard it is on now).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmshard.resharding import ReshardError
from lmshard.routing import SlotMap
from lmshard.slot_state import slot_ranges, slots_from_ranges


class PlanError(ReshardError):
    """A re-shard that cannot be planned (a bad range, a shard count out of range)."""

    hint = "nothing was changed"


@dataclass(frozen=True)
class Move:
    """Slots ``slots`` go from shard ``source`` to shard ``dest``."""

    source: int
    dest: int
    slots: frozenset[int]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "dest": self.dest, "slots": slot_ranges(self.slots)}

    @classmethod
    def from_json(cls, data: dict[str, Any], slots: int) -> Move:
        return cls(int(data["source"]), int(data["dest"]),
                   slots_from_ranges(data["slots"], slots))

    def describe(self) -> str:
        return f"slots {show_slots(self.slots)} ({len(self.slots)}) from shard {self.source} " \
               f"to shard {self.dest}"


def show_slots(slots: frozenset[int] | set[int]) -> str:
    """``0-127,512-639``: slots as inclusive ranges."""
    return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in slot_ranges(slots))


def shares(slots: int, shards: int) -> list[int]:
    """How many slots each of ``shards`` shards holds when they are spread evenly."""
    return [slots // shards + (1 if n < slots % shards else 0) for n in range(shards)]


def apply_moves(slot_map: SlotMap, moves: list[Move], shards: int | None = None) -> SlotMap:
    """``slot_map`` after ``moves``, over ``shards`` shards (default: the map's)."""
    table = list(slot_map.assignment)
    for m in moves:
        for s in m.slots:
            table[s] = m.dest
    return SlotMap(shards or slot_map.shards, slot_map.slots, table, empty_ok=True)


def plan_shards(slot_map: SlotMap, shards: int, max_shards: int) -> list[Move]:
    """The moves that take ``slot_map`` to ``shards`` shards (grow or shrink)."""
    old = slot_map.shards
    if not 1 <= shards <= min(max_shards, slot_map.slots):
        raise PlanError(f"--shards {shards} is out of range: expected 1 to "
                        f"{min(max_shards, slot_map.slots)}")
    if shards == old:
        raise PlanError(f"the service has {old} shards already: nothing to move")
    owned = {n: slot_map.slots_of(n) for n in range(old)}
    target = shares(slot_map.slots, shards)
    moves: list[Move] = []
    if shards > old:
        for new in range(old, shards):
            need = target[new]
            while need:
                donor = max(range(old), key=lambda d: (len(owned[d]) - target[d], -d))
                spare = len(owned[donor]) - target[donor]
                if spare <= 0:
                    break
                k = min(need, spare)
                taken, owned[donor] = owned[donor][-k:], owned[donor][:-k]
                moves.append(Move(donor, new, frozenset(taken)))
                need -= k
    else:
        count = {n: len(owned[n]) for n in range(shards)}
        for gone in range(shards, old):
            left = owned[gone]
            while left:
                dest = max(range(shards), key=lambda d: (target[d] - count[d], -d))
                k = min(len(left), max(1, target[dest] - count[dest]))
                given, left = left[:k], left[k:]
                count[dest] += k
                moves.append(Move(gone, dest, frozenset(given)))
    return merge_moves(moves)


def merge_moves(moves: list[Move]) -> list[Move]:
    """Moves of the same source and destination as one."""
    out: dict[tuple[int, int], set[int]] = {}
    for m in moves:
        out.setdefault((m.source, m.dest), set()).update(m.slots)
    return [Move(s, d, frozenset(v)) for (s, d), v in out.items()]


def parse_range(text: str, slots: int) -> frozenset[int]:
    """``FIRST-LAST`` (inclusive) or one slot ``N``; PlanError unless within 0..slots-1."""
    first_s, sep, last_s = text.partition("-")
    try:
        first = int(first_s)
        last = int(last_s) if sep else first
    except ValueError:
        raise PlanError(f"--move {text!r}: expected FIRST-LAST, two slot numbers such as "
                        "0-127") from None
    if not 0 <= first <= last < slots:
        raise PlanError(f"--move {text}: expected 0 <= FIRST <= LAST <= {slots - 1} (the "
                        f"service has {slots} slots)")
    return frozenset(range(first, last + 1))


def plan_range(slot_map: SlotMap, slots: frozenset[int], dest: int) -> list[Move]:
    """The moves that put ``slots`` on shard ``dest``: one per shard they are on now."""
    if not 0 <= dest < slot_map.shards:
        raise PlanError(f"--to {dest}: expected a shard from 0 to {slot_map.shards - 1} "
                        "(add shards with --shards M)")
    by_source: dict[int, set[int]] = {}
    for s in sorted(slots):
        owner = slot_map.assignment[s]
        if owner != dest:
            by_source.setdefault(owner, set()).add(s)
    if not by_source:
        raise PlanError(f"slots {show_slots(slots)} are on shard {dest} already")
    return [Move(src, dest, frozenset(v)) for src, v in sorted(by_source.items())]
