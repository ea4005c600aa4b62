"""A whole re-shard: plan it, start it, go on with it, roll it back, show it.

``start`` refuses while a re-shard is under way (the state file, or a shard recording moving
slots or another version than the config's) and when an owner does not answer; it plans the
moves from the map every shard records and writes the state file before it changes anything.
A grow first records the map over the new shard count (the same assignment, one version
higher) in the old shards, writes the config and starts the new owners; then the moves run one
at a time; last the final map goes into every shard that stays and into the config, supervisord
is updated (a shrink's removed owners stop) and the removed shards' directories are renamed
``shard-NN.removed-<version>``. The state file is removed when all is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lmshard.config import MAX_SHARDS, Config
from lmshard.resharding import ReshardError
from lmshard.resharding.admin import OwnerAdmin
from lmshard.resharding.mover import Mover, Report
from lmshard.resharding.plan import (
    PlanError,
    parse_range,
    plan_range,
    plan_shards,
    show_slots,
)
from lmshard.resharding.service import (
    config_naming,
    retire_dirs,
    supervised,
    sync_owners,
    write_config,
)
from lmshard.resharding.state import (
    ReshardState,
    load_state,
    remove_state,
    save_state,
    state_path,
)
from lmshard.routing import SlotMap
from lmshard.slot_state import SlotState

Say = Callable[[str], None]


def under_way(config: Config) -> ReshardState | None:
    """The re-shard under way for ``config`` (its state file), or None."""
    try:
        return load_state(state_path(config))
    except ValueError as exc:
        raise ReshardError(str(exc), hint="move the file away if no re-shard is under way") \
            from None


def refuse_under_way(config: Config, states: dict[int, SlotState] | None = None) -> None:
    """ReshardError if a re-shard is under way: the state file, or (given the shards' slot
    states) a shard recording moving slots or a version other than the config's."""
    state = under_way(config)
    if state is not None:
        raise ReshardError(f"a re-shard is under way ({state.describe()}; state file "
                           f"{state_path(config)})",
                           hint="go on with `lmshard reshard --resume`, or undo the move under "
                           "way with `lmshard reshard --rollback`")
    for n, st in (states or {}).items():
        if st.moving or st.version != config.slot_map_version:
            raise ReshardError(
                f"shard {n} records {st.describe()}, but the config has slot map version "
                f"{config.slot_map_version} and no re-shard is under way",
                hint="a re-shard was interrupted and its state file is gone: put the state "
                f"file back in {config.run_dir}, or bring the config up to the shards' map")


def check_request(config: Config, *, shards: int | None, move: str | None, to: int | None
                  ) -> None:
    """PlanError for a request no map makes sense of (checked before the owners are asked)."""
    if not config.changes_enabled:
        raise PlanError("a re-shard follows each source shard's change log, and [changes] "
                        "enabled is false", hint="switch the change log on (it starts with "
                        "the owners' next start), then re-shard")
    if shards is not None:
        top = min(MAX_SHARDS, config.slots)
        if not 1 <= shards <= top:
            raise PlanError(f"--shards {shards} is out of range: expected 1 to {top}")
        if shards > config.shards:
            # The config must describe the new shards (endpoints) before anything changes.
            config_naming(config, shards)
        if shards != config.shards and not supervised(config):
            what = "adding" if shards > config.shards else "removing"
            raise ReshardError(f"{what} shards needs the service under supervisord (it "
                               f"{'starts the new' if what == 'adding' else 'stops the removed'}"
                               " owners), and supervisord is not running",
                               hint="start it with `lmshard up`")
    elif move is not None:
        parse_range(move, config.slots)
        if to is None:
            raise PlanError("--move FIRST-LAST needs --to SHARD")


def plan(config: Config, current: SlotMap, *, shards: int | None, move: str | None,
         to: int | None) -> ReshardState:
    """The state of a new re-shard of ``current`` (the map every shard records)."""
    if shards is not None:
        moves = plan_shards(current, shards, MAX_SHARDS)
        kind = "grow" if shards > current.shards else "shrink"
    else:
        if move is None or to is None:
            raise PlanError("give --shards M, or --move FIRST-LAST --to SHARD")
        moves = plan_range(current, parse_range(move, current.slots), to)
        kind, shards = "move", current.shards
    return ReshardState(kind, current.shards, shards, current.slots, moves)


class Reshard:
    """Runs the re-shard of one service: ``start``, ``resume``, ``rollback``."""

    def __init__(self, config: Config, say: Say, report: Report) -> None:
        self.config = config
        self.say = say
        self.report = report
        self.path: Path = state_path(config)
        self.schema = config.load_schema()

    def _admin(self, shards: int) -> OwnerAdmin:
        """A connection to shards 0 .. ``shards - 1`` (more than the config has while it
        still names fewer)."""
        return OwnerAdmin(config_naming(self.config, shards))

    def start(self, *, shards: int | None, move: str | None, to: int | None) -> None:
        """Plan and carry out a new re-shard."""
        refuse_under_way(self.config)
        check_request(self.config, shards=shards, move=move, to=to)
        with OwnerAdmin(self.config, owner_wait=0) as admin:  # not running: said at once
            states = admin.states(range(self.config.shards))
            refuse_under_way(self.config, states)
            current = max(states.values(), key=lambda st: st.version).map
        state = plan(self.config, current, shards=shards, move=move, to=to)
        self.say(f"re-shard: {state.what()}, {len(state.moves)} "
                 f"move{'s' if len(state.moves) > 1 else ''}")
        for m in state.moves:
            self.say(f"  {m.describe()}")
        save_state(self.path, state)
        self._go(state)

    def resume(self) -> None:
        """Go on with the re-shard under way from its recorded stage and phase."""
        state = self._require()
        self.say(f"re-shard: going on with {state.describe()}")
        self._go(state)

    def rollback(self) -> None:
        """Undo the move under way (if it has not switched) and stop the re-shard there: the
        moves done stay done, the config is brought up to the shards' map."""
        state = self._require()
        with self._admin(max(state.shards, state.old_shards)) as admin:
            if state.stage == "moves" and state.phase != "done":
                mover = Mover(self.config, self.schema, admin, state,
                              lambda: save_state(self.path, state), self.report, self.say)
                try:
                    mover.rollback(state.move)
                finally:
                    mover.close()
                self.say(f"rolled back the move of {state.move.describe()}")
            elif state.stage == "finish":
                raise ReshardError("the re-shard has done every move and is finishing",
                                   hint="finish it with `lmshard reshard --resume`")
            states = admin.states(range(max(state.shards, state.old_shards)))
        self._settle(state, states, final=False)
        remove_state(self.path)
        self.say("re-shard stopped; `lmshard reshard --status` shows the shards")

    def _require(self) -> ReshardState:
        state = under_way(self.config)
        if state is None:
            raise ReshardError(f"no re-shard is under way (no {self.path})",
                               hint="start one with --shards M or --move FIRST-LAST --to N")
        return state

    def _save(self, state: ReshardState) -> None:
        save_state(self.path, state)

    def _go(self, state: ReshardState) -> None:
        every = max(state.shards, state.old_shards)
        if state.stage == "start":
            if state.kind == "grow":
                self._grow_start(state)
            state.stage, state.current, state.phase = "moves", 0, "incoming"
            self._save(state)
        if state.stage == "moves":
            with self._admin(every) as admin:
                mover = Mover(self.config, self.schema, admin, state,
                              lambda: self._save(state), self.report, self.say)
                try:
                    while state.current < len(state.moves):
                        move = state.move
                        if state.phase != "done":
                            self.say(f"move {state.current + 1}/{len(state.moves)}: "
                                     f"{move.describe()}")
                            pause = mover.run(move)
                            self.say(f"move {state.current + 1}/{len(state.moves)} done: "
                                     f"writes to slots {show_slots(move.slots)} paused "
                                     f"{pause:.1f} ms")
                        state.current += 1
                        state.phase = "incoming"
                        state.replayed = state.switch_version = None
                        if state.current < len(state.moves):
                            self._save(state)
                finally:
                    mover.close()
            state.current = max(0, len(state.moves) - 1)
            state.stage, state.phase = "finish", "done"
            self._save(state)
        with self._admin(every) as admin:
            states = admin.states(range(every))
        self._settle(state, states, final=True)
        remove_state(self.path)
        if state.pauses_ms:
            self.say(f"write pauses per move: max {max(state.pauses_ms):.1f} ms, "
                     f"{len(state.pauses_ms)} move{'s' if len(state.pauses_ms) != 1 else ''}")
        self.say(f"re-shard done: {state.shards} shards, slot map version "
                 f"{self.config.slot_map_version}")

    def _grow_start(self, state: ReshardState) -> None:
        """Record the map over the new shard count (same assignment, one version up) in the
        old shards, write the config, start the new owners."""
        with self._admin(state.old_shards) as admin:
            states = admin.states(range(state.old_shards))
            top = max(states.values(), key=lambda st: st.version)
            wide = SlotMap(state.shards, state.slots, top.map.assignment, empty_ok=True)
            version = top.version if top.map == wide else top.version + 1
            for n, st in states.items():
                if st.version < version or st.map != wide:
                    admin.record(n, replace(st, version=version, map=wide))
        self.config = write_config(self.config, wide, version)
        self.say(f"wrote {self.config.path}: {state.shards} shards, slot map version {version}")
        sync_owners(self.config, state.old_shards, self.say)
        self.say(f"shards {state.old_shards}..{state.shards - 1} are up")

    def _settle(self, state: ReshardState, states: dict[int, SlotState], *, final: bool) -> None:
        """Bring every shard that stays and the config to one map: after a shrink's last move
        the map over fewer shards, recorded one version up; write the config; update
        supervisord; rename the directories of removed shards."""
        top = max(states.values(), key=lambda st: st.version)
        if final:
            keep = state.shards
        else:  # stopped half-way: every shard that owns slots, and every shard configured
            keep = max(self.config.shards, *(n + 1 for n in top.map.assignment))
        version, slot_map = top.version, top.map
        if slot_map.shards != keep:
            slot_map = SlotMap(keep, slot_map.slots, slot_map.assignment, empty_ok=True)
            version += 1
        lagging = [n for n in range(keep) if states[n].version < version]
        if lagging:
            with self._admin(len(states)) as admin:
                for n in lagging:
                    admin.record(n, replace(states[n], version=version, map=slot_map))
        if (self.config.shards, self.config.slot_map, self.config.slot_map_version) != (
                slot_map.shards, slot_map, version):
            old = self.config
            self.config = write_config(self.config, slot_map, version)
            self.say(f"wrote {self.config.path}: {slot_map.shards} shards, slot map version "
                     f"{version}")
            if supervised(self.config):
                sync_owners(self.config, old.shards, self.say)
            for path in retire_dirs(self.config, slot_map.shards, old.shards, version):
                self.say(f"shard directory {path.name[:8]} renamed to {path}")

