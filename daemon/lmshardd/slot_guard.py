"""What a shard's slot state (``lmshard.slot_state``) means for the requests its owner serves.

An owner serves by the slot map of its shard's own records. While no re-shard touches the
shard and a request was routed by a map no older than the shard's, every key of it is the
shard's: the owner's write path checks that with one compare (``SlotGuard.floor``). Otherwise
each op's slot is checked:

- a client write to a slot this shard does not own (which includes ``incoming`` slots) is
  refused with ``SlotMoved``, carrying the shard's map, which the client adopts;
- a client write to a ``frozen`` slot is refused with ``SlotsMoving``: the client sends it again
  a moment later, by which time the move has switched (and it gets ``SlotMoved``) or was undone;
- a ``move_rows`` batch may only put or delete rows of ``incoming`` slots and delete rows of
  ``outgoing`` ones (``ProtocolError`` otherwise).

Reads never return rows of foreign slots (``incoming | outgoing``); a get of a key whose slot
the shard does not own, or a range read, from a request routed by an older map is answered
``SlotMoved`` so the client reads where the rows are now (``read_guarded``).

A new state (the ``slot_state`` command) is checked before it is recorded: never a lower
version than the shard's, the same map for the same version, the same number of slots, frozen
slots owned by the shard and foreign ones not (``check_new_state``).
"""

from __future__ import annotations

from typing import Any

from lmshard.errors import Error, ProtocolError, SlotMoved, SlotsMoving
from lmshard.protocol import COUNT, GET, GET_MANY, LOOKUP, SCAN, Command, MovedOps
from lmshard.protocol.ops import OP_DELETE, Op
from lmshard.slot_state import ForeignRows, RecordedState, RowSlots, SlotState
from lmshard.txn import ReadTxn

__all__ = ["MOVE_ROWS_VERSION", "RecordedSlots", "SlotGuard", "check_new_state", "read_guarded"]

MOVE_ROWS_VERSION = -1
"""The map version a ``move_rows`` batch is drained with: below every shard's, so the write
path's one compare sends it to ``SlotGuard.refusal``, which checks it against the moves."""
NEVER = 2**63
"""``SlotGuard.floor`` while slots are frozen: no request version reaches it."""


class SlotGuard:
    """Shard ``shard``'s slot state as its owner applies it to requests (see the module doc)."""

    __slots__ = ("shard", "state", "rows", "floor", "foreign", "skip", "_wire_map")

    def __init__(self, shard: int, state: SlotState) -> None:
        self.shard = shard
        self.state = state
        self.rows = RowSlots(state.map)
        self.floor = state.version if not state.frozen else NEVER
        """A write batch routed by a map of this version or later, to a shard with no frozen
        slots, needs no check of its keys."""
        self.foreign = state.foreign
        """Slots whose rows here reads skip (empty while no re-shard touches the shard)."""
        self.skip = ForeignRows(state.foreign, self.rows)
        """How reads skip them."""
        self._wire_map = state.map.to_dict()

    def moved(self, what: str, slot: int, rv: int) -> SlotMoved:
        """The refusal of a request for ``slot``, routed by map version ``rv``."""
        s = self.state
        where = s.map.assignment[slot]
        return SlotMoved(
            f"{what} slot {slot}, which shard {self.shard} does not own under its slot map "
            f"version {s.version} (shard {where} does); the request was routed by version "
            f"{rv}; nothing was applied", version=s.version, map=self._wire_map)

    def stale_map(self, rv: int) -> SlotMoved:
        """The refusal of a range read routed by an older map (rows may be elsewhere now)."""
        s = self.state
        return SlotMoved(
            f"shard {self.shard} serves slot map version {s.version}; the read was routed by "
            f"version {rv}, under which rows it asks for may be on other shards",
            version=s.version, map=self._wire_map)

    def refusal(self, ops: list[Op], rv: int) -> Error | None:
        """Why batch ``ops`` routed by map version ``rv`` is not applied here, or None. Only
        called for a batch the one compare with ``floor`` did not let through."""
        if type(ops) is MovedOps:
            return self._moved_refusal(ops)
        s = self.state
        assignment, slot_of, shard, frozen = s.map.assignment, self.rows.slot, self.shard, s.frozen
        waits: int | None = None
        for _code, b, kb, _arg in ops:
            slot = slot_of(b, kb)
            if assignment[slot] != shard:
                return self.moved("a write to", slot, rv)
            if slot in frozen and waits is None:
                waits = slot
        if waits is None:
            return None
        return SlotsMoving(f"slot {waits} of shard {self.shard} is switching to another "
                           "shard; nothing was applied")

    def _moved_refusal(self, ops: MovedOps) -> Error | None:
        s = self.state
        slot_of = self.rows.slot
        for code, b, kb, _arg in ops:
            slot = slot_of(b, kb)
            if slot in s.incoming or (slot in s.outgoing and code == OP_DELETE):
                continue
            where = ("outgoing (which only takes deletes)" if slot in s.outgoing
                     else "neither incoming nor outgoing")
            return ProtocolError(
                f"move_rows: a row of slot {slot}, which is {where} on shard {self.shard} "
                f"({s.describe()}); nothing was applied",
                hint="move_rows copies rows of slots being moved here and drops rows of slots "
                "moved away: record the move with slot_state first (lmshard reshard does)")
        return None

    def summary(self) -> dict[str, Any]:
        """PING's ``slots``: the version and the moving slots as runs."""
        return {"version": self.state.version, **self.state.moves_dict()}


class RecordedSlots:
    """Shard ``shard``'s slot state as a process that reads its environment (the reader pool,
    a replica) finds it in each snapshot (``slot_state.RecordedState``), as a guard, built
    again only when the owner recorded another state."""

    __slots__ = ("shard", "_recorded", "_guard", "_seen")

    def __init__(self, shard: int, config: Any) -> None:
        self.shard = shard
        self._recorded = RecordedState(config)
        self._guard: SlotGuard | None = None
        self._seen: SlotState | None = None
        """The state ``_guard`` was built from."""

    def guard(self, txn: Any, meta_db: Any) -> SlotGuard:
        """The guard of the state snapshot ``txn`` sees in meta database ``meta_db``."""
        state = self._recorded.state(txn, meta_db)
        guard = self._guard
        if guard is None or state is not self._seen:
            guard = self._guard = SlotGuard(self.shard, state)
            self._seen = state
        return guard


def check_new_state(shard: int, old: SlotState, data: Any) -> SlotState:
    """The state of a ``slot_state`` body, if shard ``shard`` at ``old`` may record it;
    ProtocolError otherwise (the shard keeps ``old``)."""
    try:
        new = SlotState.from_wire(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"slot_state: not a slot state: {exc}",
                            hint="send SlotState.to_wire() (lmshard.slot_state)") from None
    if new.version < old.version:
        raise ProtocolError(
            f"slot_state: version {new.version} is older than shard {shard}'s "
            f"{old.describe()}; nothing was recorded",
            hint="a shard's map version never goes back: send the highest version any shard "
            "has (lmshard reshard --status)")
    if new.map.slots != old.map.slots:
        raise ProtocolError(f"slot_state: a map of {new.map.slots} slots for shard {shard}, "
                            f"which has {old.map.slots}; slots never change")
    if new.version == old.version and new.map != old.map:
        raise ProtocolError(
            f"slot_state: shard {shard} records another map of version {old.version}; a "
            "changed map needs a higher version", hint="send the version after the highest "
            "any shard has")
    if new.map.shards <= shard:
        raise ProtocolError(f"slot_state: a map of {new.map.shards} shards has no shard {shard}")
    own = {s for s, owner in enumerate(new.map.assignment) if owner == shard}
    for name, slots, want in (("frozen", new.frozen, True), ("incoming", new.incoming, False),
                              ("outgoing", new.outgoing, False)):
        wrong = sorted(s for s in slots if (s in own) != want)
        if wrong:
            owns = "does not own" if want else "owns"
            raise ProtocolError(
                f"slot_state: {name} slot {wrong[0]} ({len(wrong)} such), which shard {shard} "
                f"{owns} under the map sent; nothing was recorded")
    if new.incoming & new.outgoing:
        raise ProtocolError("slot_state: a slot both incoming and outgoing")
    return new


def read_guarded(guard: SlotGuard, cmd: Command, args: Any, rv: int, r: ReadTxn) -> Any:
    """``cmd``'s reply body from ``r`` under ``guard``: SlotMoved for a request routed by an
    older map that may need rows from elsewhere, and no row of a foreign slot. The plain
    handler when neither can apply."""
    handle = cmd.handle
    assert handle is not None  # every read command has a handler
    stale = rv < guard.state.version
    if not stale and not guard.foreign:
        return handle(r, args)
    if cmd is GET or cmd is GET_MANY:
        b, keys = (args[0], [args[1]]) if cmd is GET else args
        foreign = _slot_check(guard, b, keys, rv, stale)
        values = handle(r, args)
        if not foreign:
            return values
        if cmd is GET:
            return None
        return [None if i in foreign else v for i, v in enumerate(values)]
    if stale and cmd in (SCAN, COUNT, LOOKUP) and not _pinned_here(guard, args[0]):
        raise guard.stale_map(rv)
    if not guard.foreign:
        return handle(r, args)
    if cmd is SCAN:
        return _scan(guard, r, args)
    if cmd is COUNT:
        b, lo, hi = args
        return sum(1 for _ in guard.skip.rows(b, r.scan_raw(b.table, lo, hi, False)))
    if cmd is LOOKUP:
        b = args[0]
        return [row for row in handle(r, args) if guard.skip.keep(b, row[0])]
    return handle(r, args)


def _slot_check(guard: SlotGuard, b: Any, keys: list[bytes], rv: int, stale: bool
                ) -> set[int]:
    """The indexes of ``keys`` in foreign slots; SlotMoved for a key the shard does not own
    from a request routed by an older map."""
    s = guard.state
    slot_of, assignment, foreign = guard.rows.slot, s.map.assignment, guard.foreign
    out: set[int] = set()
    for i, kb in enumerate(keys):
        slot = slot_of(b, kb)
        if stale and assignment[slot] != guard.shard:
            raise guard.moved("a read of", slot, rv)
        if slot in foreign:
            out.add(i)
    return out


def _pinned_here(guard: SlotGuard, b: Any) -> bool:
    """Table ``b`` is pinned to a slot this shard owns (a read of it misses nothing)."""
    if not b.table.pinned:
        return False
    slot = guard.rows.slot(b, b"")
    return guard.state.map.assignment[slot] == guard.shard and slot not in guard.foreign


def _scan(guard: SlotGuard, r: ReadTxn, args: tuple[Any, Any, Any, bool, int]) -> list[Any]:
    """A scan page without rows of foreign slots (``commands._h_scan`` otherwise)."""
    b, lo, hi, reverse, limit = args
    items: list[list[bytes]] = []
    for kv in guard.skip.rows(b, r.scan_raw(b.table, lo, hi, reverse)):
        if len(items) == limit:
            return [items, True]
        items.append(list(kv))
    return [items, False]
