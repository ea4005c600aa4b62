"""The slot map a client routes by, and how it follows a re-shard: the one home of both.

A client starts from the config's map (``slot_map.runs``, ``slot_map.version``). While
``lmshard reshard`` moves slots, the shards record newer maps (``lmshard.slot_state``), and the
client learns of them in two ways: an owner refuses a write routed by an older map with
``SlotMoved`` (carrying the owner's version and map), and a local read finds a newer
``slot_map_version`` in the shard's meta records. Either way the client ``adopt``s the newer
map: the routes of every table (``ClientTable.route``, ``ClientTable.shard``) are rebuilt under
it, and ``generation`` counts the adoptions so a route cached elsewhere knows it is stale. An
older or equal version is ignored, so threads that learn of the same move at once adopt it once.

A map may name more shards than the config (a re-shard that grew the service): the listeners
(the owner connections, the local reads, the tables' per-shard handles) grow their per-shard
arrays, and the new shards' endpoints and directories come from the config file's patterns
(``grown_config``).

What a refused write means, for every way of writing (``Client``, ``Batch``, the pipelined
``Writer``, the async client): ``SlotMoved`` -> adopt the map, route the refused ops again and
send them as new requests (the refusing owner never applied them and never will);
``SlotsMoving`` -> wait (``MOVING_FIRST_WAIT_S`` doubling up to ``MOVING_MAX_WAIT_S``) and send
the same request again (same sequence number), until the move switches or the call's time is
up.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmshard.config import Config
from lmshard.config.model import build_config
from lmshard.errors import ConfigError, SlotMoved
from lmshard.routing import SlotMap, TableRoute
from lmshard.slot_state import ForeignRows, RowSlots, SlotState

if TYPE_CHECKING:
    from lmshard.schema import Table

__all__ = ["MOVING_FIRST_WAIT_S", "MOVING_MAX_WAIT_S", "SlotRoutes",
           "follow_moved", "grown_config", "moving_waits", "shard_view"]

MOVING_FIRST_WAIT_S = 0.001
"""First wait (1 ms) before a write refused with SlotsMoving is sent again."""
MOVING_MAX_WAIT_S = 0.02
"""Longest wait (20 ms) between two sends of a write refused with SlotsMoving: the waits double
from MOVING_FIRST_WAIT_S up to this."""


def moving_waits() -> Any:
    """The waits (seconds) before each resend of a write refused with SlotsMoving."""
    wait = MOVING_FIRST_WAIT_S
    while True:
        yield wait
        wait = min(wait * 2, MOVING_MAX_WAIT_S)


Listener = Callable[[SlotMap], None]
"""Told of every map adopted (after ``SlotRoutes.map`` is the new one)."""


class SlotRoutes:
    """A client's current slot map: ``version``, ``map`` and ``version_bytes`` (the version as
    the shards' meta record ``slot_map_version`` holds it, which local reads compare with), the
    routes of its tables, and the ``generation`` of adoptions. Thread-safe."""

    def __init__(self, version: int, slot_map: SlotMap) -> None:
        self.version = version
        self.map = slot_map
        self.version_bytes = str(version).encode()
        """``version`` as the meta record ``slot_map_version`` spells it."""
        self.generation = 0
        """How many newer maps were adopted: a route built at another generation is stale."""
        self._routes: dict[bytes, tuple[int, TableRoute]] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    @classmethod
    def of_config(cls, config: Config) -> SlotRoutes:
        return cls(config.slot_map_version, config.slot_map)

    @property
    def shards(self) -> int:
        """How many shards the current map names (the config's, or more after a growth)."""
        return self.map.shards

    def listen(self, listener: Listener) -> None:
        """Call ``listener(map)`` on every adoption of a newer map."""
        self._listeners.append(listener)

    def route(self, table: Table) -> TableRoute:
        """``table``'s route under the current map (built once per table and generation)."""
        cached = self._routes.get(table.table_id.bytes)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        route = TableRoute(table, self.map)
        self._routes[table.table_id.bytes] = (self.generation, route)
        return route

    def adopt(self, version: int, slot_map: SlotMap) -> bool:
        """Route by ``slot_map`` (of ``version``) from now on, if it is newer than the current
        one; whether it was."""
        if version <= self.version:
            return False
        with self._lock:
            if version <= self.version:
                return False
            for listener in self._listeners:  # grow per-shard arrays before routing there
                listener(slot_map)
            self.map = slot_map
            self.version_bytes = str(version).encode()
            self.version = version
            self.generation += 1
            self._routes = {}
        return True

    def adopt_moved(self, err: SlotMoved) -> bool:
        """Adopt the map a ``SlotMoved`` answer carries (if newer); whether it was. An answer
        without a readable map raises it: the client cannot tell where the keys went."""
        if err.version <= self.version:
            return False
        try:
            slot_map = SlotMap.from_dict(err.map or {}, empty_ok=True)
        except ValueError as exc:
            raise SlotMoved(f"{err} (and its slot map cannot be read: {exc})",
                            version=err.version, map=err.map) from exc
        return self.adopt(err.version, slot_map)

    def stale(self, version: int) -> bool:
        """Whether a request sent under map ``version`` was routed by an older map than the
        current one (so its refusal is answered by routing it again)."""
        return version < self.version


def follow_moved(routes: SlotRoutes, answer: Any, sent_version: int) -> bool:
    """Whether ``answer`` to a write routed by map ``sent_version`` is a SlotMoved that a
    newer map answers: it is adopted (if no other call did first), and the write's ops go
    where the current map routes them, as new requests."""
    if type(answer) is not SlotMoved:
        return False
    routes.adopt_moved(answer)
    return routes.version > sent_version


def grown_config(config: Config, shards: int) -> Config:
    """``config`` with ``shards`` shards, the new shards' endpoints and directories from the
    config file's patterns (``{shard}``, ``{port}``); ConfigError when the config has no file
    or lists the endpoints one by one."""
    if config.path is None:
        raise ConfigError(
            f"the shards' slot map names {shards} shards and this client's config "
            f"{config.shards}, which was not read from a file: the new shards' endpoints "
            "are unknown", hint="connect with the config file the re-shard wrote")
    raw = tomllib.loads(config.path.read_text("utf-8"))
    raw["shards"] = shards
    raw.pop("slot_map", None)  # the config's own map names fewer shards
    try:
        return build_config(raw, file=config.path, base_dir=config.path.parent)
    except ConfigError as exc:
        raise ConfigError(
            f"the shards' slot map names {shards} shards and {config.path} only "
            f"{config.shards}, and endpoints for the others cannot be made from it: {exc}",
            hint="write shard endpoints as patterns with {shard} or {port}, or connect with "
            "the config file the re-shard wrote") from exc


def shard_view(shard: int, state: SlotState, routes: SlotRoutes) -> ForeignRows | None:
    """What a read of ``shard``, whose records say ``state``, skips under the client's map
    (adopting ``state``'s map first when it is newer); None: nothing."""
    if state.version > routes.version:
        routes.adopt(state.version, state.map)
    skip = set(state.foreign)
    if state.version < routes.version:
        mine = routes.map.assignment
        skip.update(s for s, owner in enumerate(state.map.assignment)
                    if owner == shard and mine[s] != shard)
    return ForeignRows(frozenset(skip), RowSlots(routes.map)) if skip else None
