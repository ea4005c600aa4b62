"""A shard's slot state: the versioned slot map it serves by, and the slots a re-shard is moving.

The config's slot map (``slot_map.runs``, ``slot_map.version``) is where a service starts. A
re-shard (``lmshard reshard``) moves slots between shards while the service runs: each switch
of a slot range records a new map, one version higher, in the meta database of every shard
(the destination first, then the source, then the others), and the config file is brought up to
date once the whole re-shard is done. So a shard's own records are the truth: an owner serves
by the map of the highest version it has, and a client that routes by an older map is told
(``SlotMoved``) and reloads it.

Besides the map, a shard records the slots it is moving:

- ``frozen``: slots it owns whose writes wait (``SlotsMoving``, which clients retry by
  themselves) while a move of them switches to another shard;
- ``incoming``: slots being copied here that it does not own yet;
- ``outgoing``: slots it gave away whose rows are still here until the re-shard drops them.

Rows of ``incoming`` and ``outgoing`` slots are *foreign*: reads never return them.

Meta records (all ASCII JSON or decimal, readable with ``mdb_dump``): ``slot_map_version``,
``slot_map_runs`` (``SlotMap.to_dict()``), ``slot_moves`` (the three sets as runs
``[[first, end (exclusive)], ...]``), and ``slot_map``, the map's digest, which backups and older
readers compare with the config's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmshard.errors import SchemaMismatch
from lmshard.routing import SlotMap, TableRoute

__all__ = [
    "META_DIGEST", "META_MAP", "META_MOVES", "META_VERSION", "SlotState", "check_slot_state",
    "ForeignRows", "NO_MOVES", "RecordedState", "RowSlots", "config_state", "read_slot_state",
    "slot_ranges", "slots_from_ranges",
]

META_VERSION = b"slot_map_version"
META_MAP = b"slot_map_runs"
META_MOVES = b"slot_moves"
META_DIGEST = b"slot_map"


def slot_ranges(slots: Iterable[int]) -> list[list[int]]:
    """``slots`` as sorted maximal runs ``[first, end (exclusive)]``."""
    out: list[list[int]] = []
    for s in sorted(set(slots)):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def slots_from_ranges(ranges: Any, slots: int) -> frozenset[int]:
    """The slots of runs ``[[first, end], ...]``; ValueError unless each lies in 0..slots."""
    if not isinstance(ranges, list):
        raise ValueError(f"slot ranges must be a list of [first, end], not {ranges!r:.40}")
    out: set[int] = set()
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(type(v) is int for v in r)
                or not 0 <= r[0] < r[1] <= slots):
            raise ValueError(f"slot range {r!r:.40} is not [first, end] within 0..{slots}")
        out.update(range(r[0], r[1]))
    return frozenset(out)


@dataclass(frozen=True)
class SlotState:
    """One shard's slot map (``version``, ``map``) and the slots a re-shard is moving."""

    version: int
    map: SlotMap
    frozen: frozenset[int] = field(default_factory=frozenset)
    """Slots this shard owns whose writes wait while a move switches them."""
    incoming: frozenset[int] = field(default_factory=frozenset)
    """Slots being copied here, not owned yet."""
    outgoing: frozenset[int] = field(default_factory=frozenset)
    """Slots given away whose rows are still here until dropped."""

    @property
    def foreign(self) -> frozenset[int]:
        """Slots whose rows here reads must skip: ``incoming | outgoing``."""
        return self.incoming | self.outgoing

    @property
    def moving(self) -> bool:
        """A re-shard is moving slots to or from this shard."""
        return bool(self.frozen or self.incoming or self.outgoing)

    def owns(self, shard: int, slot: int) -> bool:
        return self.map.assignment[slot] == shard

    def moves_dict(self) -> dict[str, list[list[int]]]:
        return {"frozen": slot_ranges(self.frozen), "incoming": slot_ranges(self.incoming),
                "outgoing": slot_ranges(self.outgoing)}

    def to_wire(self) -> dict[str, Any]:
        """A msgpack/JSON-safe form: ``{"version", "map", "frozen", "incoming", "outgoing"}``."""
        return {"version": self.version, "map": self.map.to_dict(), **self.moves_dict()}

    @classmethod
    def from_wire(cls, data: Any) -> SlotState:
        """Inverse of ``to_wire``; ValueError on anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a slot state is a map, not {type(data).__name__}")
        version = data.get("version")
        if type(version) is not int or version < 0:
            raise ValueError(f"slot map version must be an int >= 0, not {version!r:.40}")
        m = SlotMap.from_dict(data.get("map", {}), empty_ok=True)
        return cls(version, m, *(slots_from_ranges(data.get(k, []), m.slots)
                                 for k in ("frozen", "incoming", "outgoing")))

    def records(self) -> dict[bytes, bytes]:
        """The meta records of this state."""
        return {
            META_VERSION: str(self.version).encode(),
            META_MAP: _json(self.map.to_dict()),
            META_MOVES: _json(self.moves_dict()),
            META_DIGEST: self.map.digest().encode(),
        }

    def describe(self) -> str:
        moves = ", ".join(f"{k} {_show(v)}" for k, v in
                          (("frozen", self.frozen), ("incoming", self.incoming),
                           ("outgoing", self.outgoing)) if v)
        return f"slot map version {self.version}" + (f" ({moves})" if moves else "")


def _show(slots: frozenset[int]) -> str:
    return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in slot_ranges(slots))


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def config_state(config: Any) -> SlotState:
    """The slot state a shard without records starts from: the config's map and version."""
    return SlotState(config.slot_map_version, config.slot_map)


def read_slot_state(meta: Mapping[bytes, bytes], config: Any) -> SlotState:
    """A shard's slot state from its meta records; the config's when it has none (a new
    shard, or one written before map versions)."""
    raw = meta.get(META_VERSION)
    if raw is None:
        return config_state(config)
    m = SlotMap.from_dict(json.loads(meta[META_MAP]), empty_ok=True)
    moves = json.loads(meta.get(META_MOVES, b"{}"))
    return SlotState(int(raw), m, *(slots_from_ranges(moves.get(k, []), m.slots)
                                    for k in ("frozen", "incoming", "outgoing")))


def check_slot_state(config: Any, meta: Mapping[bytes, bytes], path: Path | str) -> SlotState:
    """The slot state of the shard directory ``path`` whose meta records are ``meta``, if the
    config may serve it: a map of a later version than the config's is the shard's own (a
    re-shard moved on and the config follows when it is done), one of the config's version
    must be the config's map, and one older than the config's is refused (the config was
    written for data this shard does not have). Raises SchemaMismatch."""
    state = read_slot_state(meta, config)
    mine = config.slot_map_version
    if META_VERSION not in meta:
        digest = meta.get(META_DIGEST)
        if digest is not None and digest != config.slot_map.digest().encode():
            raise SchemaMismatch(
                f"{path} was written with a different slot map than the config's",
                hint="restore the slot map the data was written with; changing it takes "
                "`lmshard reshard`")
        return state
    if state.version == mine and state.map != config.slot_map:
        raise SchemaMismatch(
            f"{path} records slot map version {state.version} and the config has version "
            f"{mine}, but the maps differ",
            hint="restore the config's slot_map.runs the data was written with (lmshard reshard "
            "--status shows the shards' maps)")
    if state.version < mine:
        raise SchemaMismatch(
            f"{path} records slot map version {state.version}, older than the config's "
            f"{mine}: the config was written for data this shard directory does not hold",
            hint="use the config the data was written with, or finish the re-shard that "
            "wrote this config (lmshard reshard --status)")
    return state


class RecordedState:
    """One shard's slot state as a process that reads its environment finds it in each
    snapshot (a client's local reads, the reader pool, a replica): ``key`` is two small meta
    reads, the version and the moving slots, which say whether anything changed (a version
    names one map); ``state`` reads the map and parses the records again only when the key is
    not the one it last parsed."""

    __slots__ = ("config", "_key", "_state")

    def __init__(self, config: Any) -> None:
        self.config = config
        self._key: tuple[bytes | None, bytes | None] | None = None
        self._state: SlotState | None = None

    @staticmethod
    def key(txn: Any, meta_db: Any) -> tuple[bytes | None, bytes | None]:
        """(``slot_map_version``, ``slot_moves``) as snapshot ``txn`` sees them."""
        version, moves = txn.get(META_VERSION, None, meta_db), txn.get(META_MOVES, None, meta_db)
        return (None if version is None else bytes(version),
                None if moves is None else bytes(moves))

    def state(self, txn: Any, meta_db: Any,
              key: tuple[bytes | None, bytes | None] | None = None) -> SlotState:
        """The slot state snapshot ``txn`` sees (``key``: its ``key``, when already read)."""
        if key is None:
            key = self.key(txn, meta_db)
        state = self._state
        if state is None or key != self._key:
            records = {k: bytes(v) for k in (META_VERSION, META_MAP, META_MOVES)
                       if (v := txn.get(k, None, meta_db)) is not None}
            state = self._state = read_slot_state(records, self.config)
            self._key = key
        return state


NO_MOVES = _json({"frozen": [], "incoming": [], "outgoing": []})
"""The ``slot_moves`` record of a shard that moves no slots."""


class RowSlots:
    """The slot of a stored row, per table, under one slot map: what an owner checks a write
    against, and how reads skip foreign rows. A row's slot depends on its table's placement
    (``TableRoute.slot``): a pinned table's rows are all in the slot of its table id, a
    ``shard_key`` table's in the slot of its shard key (the key is decoded for it)."""

    __slots__ = ("map", "_routes")

    def __init__(self, slot_map: SlotMap) -> None:
        self.map = slot_map
        self._routes: dict[bytes, TableRoute] = {}

    def slot(self, b: Any, kb: bytes) -> int:
        """The slot of the row with encoded key ``kb`` in bound table ``b``
        (``lmshard.bound_tables.BoundTable``)."""
        route = self._routes.get(b.tid)
        if route is None:
            route = self._routes[b.tid] = TableRoute(b.table, self.map)
        return route.slot(b.kdec(kb) if route.needs_key else None, kb)


class ForeignRows:
    """The rows a read of one shard skips: those of ``slots`` (the shard's foreign slots,
    ``SlotState.foreign``, and for a client, while the shard records an older map than its
    own, the slots the shard still serves that the client's map gives to another), by the
    slot ``rows`` finds for each row. Owners, the reader pool, replicas and clients read with
    one."""

    __slots__ = ("slots", "_rows")

    def __init__(self, slots: frozenset[int], rows: RowSlots) -> None:
        self.slots = slots
        self._rows = rows

    def keep(self, b: Any, kb: bytes) -> bool:
        """Whether the row with encoded key ``kb`` of bound table ``b`` is one to read."""
        return self._rows.slot(b, kb) not in self.slots

    def rows(self, b: Any, items: Iterable[tuple[bytes, bytes]]
             ) -> Iterator[tuple[bytes, bytes]]:
        """The (key, value) pairs of ``items`` to read."""
        slot = self._rows.slot
        skip = self.slots
        return ((k, v) for k, v in items if slot(b, k) not in skip)
