"""Slot map and routing: which shard owns a key.

A key's partition bytes (the key itself, or the table's declared shard key) hash with a stable,
portable hash (CRC-32 from ``zlib``, never Python's per-process salted ``hash()``) into one of a
fixed number of slots; the slot map assigns every slot to one shard. The map is stored in the
config and in every shard's meta table; a shard refuses to open with a map whose ``digest()``
differs from the one it was created with.

Serialized form (``SlotMap.to_dict()``), JSON- and TOML-safe::

    {"shards": 4, "slots": 1024, "runs": [[0, 256, 0], [256, 512, 1], ...]}

Each run is ``[start, end, shard]``: slots ``start`` .. ``end - 1`` (``end`` is exclusive, as in
``range``) belong to ``shard``. Runs are sorted, contiguous and cover every slot exactly once.

A table's own rules (pinned, a ``shard_key`` function, ``shard_key=n``) are applied in one place,
``TableRoute``, built once per table and slot map: the client's reads, ``Batch``, ``Writer`` and
the remote reads all ask it which shard a key is on and which shards a prefix can be on.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lmshard.keys import encode_index_value

if TYPE_CHECKING:
    from lmshard.schema import Table

__all__ = ["DEFAULT_SLOTS", "SlotMap", "TableRoute", "slot_of"]

#: Number of hash slots when the config does not say otherwise. Fixed for the life of a store:
#: changing it moves keys between slots, so it is part of the slot map's digest.
DEFAULT_SLOTS = 1024

_crc32 = zlib.crc32
_GOLDEN = 0x9E3779B1  # 2**32 / golden ratio, odd
_DIGEST_TAG = b"lmshard.slotmap.v1\n"


def partition_hash(partition: bytes) -> int:
    """A stable 16-bit hash of ``partition``: the same on every host, version and process.

    CRC-32 (``zlib.crc32``) is fast but linear over GF(2): keys that differ in a few low bits
    (sequential integers) can land on only some of a range of slots. One multiplication by an
    odd constant and taking the high half mixes every bit into the result (Fibonacci hashing).
    """
    return ((_crc32(partition) * _GOLDEN) & 0xFFFFFFFF) >> 16


def slot_of(partition: bytes, slots: int) -> int:
    """Return the slot (``0 <= slot < slots``) of ``partition`` (any bytes-like object)."""
    return (((_crc32(partition) * _GOLDEN) & 0xFFFFFFFF) >> 16) % slots


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SlotMap:
    """An immutable assignment of ``slots`` hash slots to ``shards`` shards.

    ``assignment[slot]`` is the shard that owns ``slot``. By default slots are split into
    contiguous, equal-as-possible ranges: slot ``s`` belongs to shard ``s * shards // slots``.
    """

    __slots__ = ("_shards", "_slots", "_assignment")

    def __init__(
        self, shards: int, slots: int = DEFAULT_SLOTS, assignment: Sequence[int] | None = None,
        *, empty_ok: bool = False,
    ) -> None:
        if not _is_int(shards) or shards < 1:
            raise ValueError(f"slot map: shards must be an integer >= 1, got {shards!r}")
        if not _is_int(slots) or slots < shards:
            raise ValueError(
                f"slot map: slots must be an integer >= shards ({shards}), got {slots!r}; "
                "every shard needs at least one slot"
            )
        if assignment is None:
            table = tuple(s * shards // slots for s in range(slots))
        else:
            table = tuple(assignment)
            if len(table) != slots:
                raise ValueError(
                    f"slot map: assignment has {len(table)} entries, expected one per slot "
                    f"({slots})"
                )
            for slot, shard in enumerate(table):
                if not _is_int(shard) or not 0 <= shard < shards:
                    raise ValueError(
                        f"slot map: slot {slot} is assigned to {shard!r}, expected a shard "
                        f"number from 0 to {shards - 1}"
                    )
            owned = set(table)
            if len(owned) != shards and not empty_ok:
                missing = sorted(set(range(shards)) - owned)
                raise ValueError(
                    f"slot map: shard(s) {missing} own no slot; every shard must own at least one"
                )
        self._shards = shards
        self._slots = slots
        self._assignment = table

    # -- attributes ---------------------------------------------------------------------------

    @property
    def shards(self) -> int:
        """Number of shards."""
        return self._shards

    @property
    def slots(self) -> int:
        """Number of hash slots."""
        return self._slots

    @property
    def assignment(self) -> tuple[int, ...]:
        """``assignment[slot]`` is the shard owning ``slot``."""
        return self._assignment

    # -- routing ------------------------------------------------------------------------------

    def shard_of_slot(self, slot: int) -> int:
        """Return the shard that owns ``slot``."""
        if not 0 <= slot < self._slots:
            raise ValueError(f"slot {slot!r} out of range: expected 0 to {self._slots - 1}")
        return self._assignment[slot]

    def shard_of(self, partition: bytes) -> int:
        """Return the shard that owns ``partition`` (bytes-like): one hash, one index."""
        return self._assignment[(((_crc32(partition) * _GOLDEN) & 0xFFFFFFFF) >> 16) % self._slots]

    def slot_of(self, partition: bytes) -> int:
        """Return the slot of ``partition`` in this map."""
        return slot_of(partition, self._slots)

    def slots_of(self, shard: int) -> list[int]:
        """Return the slots that ``shard`` owns, ascending."""
        if not 0 <= shard < self._shards:
            raise ValueError(f"shard {shard!r} out of range: expected 0 to {self._shards - 1}")
        return [slot for slot, owner in enumerate(self._assignment) if owner == shard]

    def slot_counts(self) -> list[int]:
        """Return how many slots each shard owns (index = shard number)."""
        counts = [0] * self._shards
        for owner in self._assignment:
            counts[owner] += 1
        return counts

    def is_default(self) -> bool:
        """True if this is the default contiguous map for its shard and slot counts."""
        return self == SlotMap(self._shards, self._slots)

    # -- serialization ------------------------------------------------------------------------

    def runs(self) -> list[list[int]]:
        """Return the map as maximal runs ``[start, end (exclusive), shard]``."""
        out: list[list[int]] = []
        start = 0
        table = self._assignment
        for slot in range(1, self._slots + 1):
            if slot == self._slots or table[slot] != table[start]:
                out.append([start, slot, table[start]])
                start = slot
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a compact, JSON-safe form: ``{"shards", "slots", "runs"}``."""
        return {"shards": self._shards, "slots": self._slots, "runs": self.runs()}

    @classmethod
    def from_runs(cls, shards: int, slots: int, runs: Iterable[Sequence[int]], *,
                  empty_ok: bool = False) -> SlotMap:
        """Build a map from runs ``[start, end (exclusive), shard]`` (see the module docstring).

        Runs must be sorted, contiguous and cover slots ``0 .. slots - 1``; adjacent runs may
        name the same shard. Raises ``ValueError`` naming the offending run. ``empty_ok``: a
        shard may own no slot (a shard being added or emptied by a re-shard).
        """
        if not _is_int(slots) or slots < 1:
            raise ValueError(f"slot map: slots must be an integer >= 1, got {slots!r}")
        table: list[int] = []
        for index, run in enumerate(runs):
            if (
                isinstance(run, (str, bytes))
                or not isinstance(run, Sequence)
                or len(run) != 3
                or not all(_is_int(v) for v in run)
            ):
                raise ValueError(
                    f"slot map: run {index} is {run!r}, expected [start, end, shard] integers"
                )
            start, end, shard = run
            if start != len(table):
                raise ValueError(
                    f"slot map: run {index} {list(run)} starts at slot {start}, expected "
                    f"{len(table)} (runs must be sorted and contiguous, without gaps or overlaps)"
                )
            if not start < end <= slots:
                raise ValueError(
                    f"slot map: run {index} {list(run)} must satisfy start < end <= slots "
                    f"({slots}); end is exclusive"
                )
            table.extend([shard] * (end - start))
        if len(table) != slots:
            raise ValueError(
                f"slot map: runs cover slots 0 to {len(table) - 1}, expected 0 to {slots - 1}"
            )
        return cls(shards, slots, table, empty_ok=empty_ok)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, empty_ok: bool = False) -> SlotMap:
        """Inverse of ``to_dict()``; raises ``ValueError`` on any malformed input."""
        if not isinstance(data, Mapping):
            raise ValueError(f"slot map: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {"shards", "slots", "runs"}
        missing = {"shards", "slots", "runs"} - set(data)
        if unknown or missing:
            raise ValueError(
                "slot map: expected exactly the keys shards, slots, runs"
                + (f"; unknown: {sorted(unknown)}" if unknown else "")
                + (f"; missing: {sorted(missing)}" if missing else "")
            )
        runs = data["runs"]
        if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence):
            raise ValueError(f"slot map: runs must be a list, got {type(runs).__name__}")
        return cls.from_runs(data["shards"], data["slots"], runs, empty_ok=empty_ok)

    def digest(self) -> str:
        """Return the SHA-256 hex digest of a canonical encoding; equal maps, equal digests."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(_DIGEST_TAG + canonical.encode("ascii")).hexdigest()

    # -- value semantics ----------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotMap):
            return NotImplemented
        return (
            self._shards == other._shards
            and self._slots == other._slots
            and self._assignment == other._assignment
        )

    def __hash__(self) -> int:
        return hash((self._shards, self._slots, self._assignment))

    def __repr__(self) -> str:
        kind = "default" if self.is_default() else f"{len(self.runs())} runs"
        return f"SlotMap(shards={self._shards}, slots={self._slots}, {kind})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._shards, self._slots, self._assignment))


def _rebuild(shards: int, slots: int, assignment: tuple[int, ...]) -> SlotMap:
    return SlotMap(shards, slots, assignment, empty_ok=True)


KeyRouter = Callable[[Any, bytes], int]
"""The shard of a row from its key and the key's encoding: ``route(key, key_bytes)``."""


class TableRoute:
    """Where one table's rows live under one slot map: the one home of the table rules.

    ``shard(key, key_bytes)`` is the shard of a row: the table's shard when it is pinned, the
    hash of its leading elements under ``shard_key=n``, of the encoded ``shard_key(key)`` under
    a function, of the encoded key otherwise. It is a function chosen once, when the route is
    built, so a put pays one call for its routing. ``shards_for(prefix)`` names the shards a
    scan, count or lookup must read.
    """

    __slots__ = ("pinned", "only", "shard", "shards", "slot", "needs_key", "_leading",
                 "_shard_of", "_kprefix", "_slots", "_owning")

    def __init__(self, table: Table, slot_map: SlotMap) -> None:
        self.shards = slot_map.shards
        self._shard_of = slot_map.shard_of
        self._slots = slot_map.slots
        self._owning = sorted(set(slot_map.assignment))
        """The shards that own a slot: a shard a re-shard adds or empties holds no row to
        read (the rows it is being given are not its own yet)."""
        self._leading = table.shard_prefix
        self._kprefix = table.key.encode_prefix
        self.pinned: int | None = slot_map.shard_of(table.table_id.bytes) if table.pinned else None
        """The one shard of a pinned table, else None."""
        self.only: int | None = self.pinned if self.pinned is not None else (
            self._owning[0] if len(self._owning) == 1 else None)
        """The one shard every row of the table is on (pinned, or one shard owns every slot),
        else None."""
        self.shard: KeyRouter = self._key_router(table, slot_map)
        self.slot: KeyRouter = self._slot_router(table)
        """The slot of a row from its key and the key's encoding (a pinned table's rows: the
        slot of its table id): what a re-shard moves, and what an owner checks it owns."""
        self.needs_key = not table.pinned and (
            self._leading is not None or table.shard_key is not None)
        """A row's slot depends on its decoded key (``shard_key``), not only on its encoding."""

    def _slot_router(self, table: Table) -> KeyRouter:
        slots, shard_key = self._slots, table.shard_key
        if table.pinned:
            pinned_slot = slot_of(table.table_id.bytes, slots)
            return lambda key, kb: pinned_slot
        if self._leading is not None:
            n, kprefix = self._leading, self._kprefix
            return lambda key, kb: slot_of(kprefix(tuple(key[:n])), slots)
        if shard_key is not None:
            return lambda key, kb: slot_of(encode_index_value(shard_key(key)), slots)
        return lambda key, kb: (((_crc32(kb) * _GOLDEN) & 0xFFFFFFFF) >> 16) % slots

    def _key_router(self, table: Table, slot_map: SlotMap) -> KeyRouter:
        pinned, shard_of, shard_key = self.pinned, slot_map.shard_of, table.shard_key
        if pinned is not None:
            return lambda key, kb: pinned
        if self._leading is not None:
            return lambda key, kb: self.leading_shard(key)
        if shard_key is not None:
            return lambda key, kb: shard_of(encode_index_value(shard_key(key)))
        # The common case, SlotMap.shard_of inlined: one call per routed key.
        assignment, slots = slot_map.assignment, slot_map.slots

        def by_key(key: Any, kb: bytes) -> int:
            return assignment[(((_crc32(kb) * _GOLDEN) & 0xFFFFFFFF) >> 16) % slots]

        return by_key

    def leading_shard(self, elements: Sequence[Any]) -> int:
        """The shard of a ``shard_key=n`` table's rows whose key starts with ``elements``
        (n or more of them): the first n, hashed as they are encoded in the key."""
        return self._shard_of(self._kprefix(tuple(elements[:self._leading])))

    def shards_for(self, prefix: Any = None) -> list[int]:
        """The shards rows of the table (under key ``prefix``) can be on."""
        if self.pinned is not None:
            return [self.pinned]
        n = self._leading
        if n is not None and prefix is not None:
            p = prefix if isinstance(prefix, (tuple, list)) else (prefix,)
            if len(p) >= n:  # every row under the prefix has these leading elements
                return [self.leading_shard(p)]
        return list(self._owning)
