"""The state file of a re-shard: ``<run_dir>/reshard.json``, present while one is under way.

It holds the plan (the moves), which move is under way and its phase, the source's change-log
position the destination has (``replayed``), the map version a switch records, and the write
pause of each finished move. It is written (to a temporary file, fsynced, renamed over the old
one, the directory fsynced) before each phase starts, so ``lmshard reshard --resume`` knows
where to go on from and ``--rollback`` what to undo, whenever the command was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmshard.config import Config
from lmshard.ops.backup.copies import fsync_dir, write_durably
from lmshard.resharding import ReshardError
from lmshard.resharding.plan import Move, show_slots

STATE_FILE = "reshard.json"
"""Name of the state file, in the config's run directory."""
LOCK_FILE = "reshard.lock"
"""Held (``flock``) by the one ``lmshard reshard`` that runs, in the run directory; the kernel
lets go of it when that process ends, however it ends."""
FORMAT = 1
"""Layout of the state file; another layout is refused."""

STAGES = ("start", "moves", "finish")
"""A re-shard's stages: ``start`` (a grow records the wider map, writes the config and starts
the new owners), ``moves`` (one move after another), ``finish`` (the final map in every shard,
the config, supervisord, the removed shards' directories)."""
PHASES = ("incoming", "copy", "catchup", "frozen", "switch", "drop", "done")
"""One move's phases, in order (docs/resharding.md): the destination records the slots as
incoming; their rows are copied; the source's change log is replayed; the source freezes the
slots and the log is replayed to the freeze; the map switches; the source drops the rows."""
SWITCHED = PHASES.index("switch")
"""Moves at this phase or later can no longer be rolled back."""


def state_path(config: Config) -> Path:
    """Where ``config``'s re-shard keeps its state file."""
    return config.run_dir / STATE_FILE


@dataclass
class ReshardState:
    """A re-shard under way, as its state file holds it."""

    kind: str
    """``grow``, ``shrink`` or ``move``."""
    old_shards: int
    shards: int
    """Shard count before and after."""
    slots: int
    moves: list[Move]
    stage: str = "start"
    current: int = 0
    """Index in ``moves`` of the move under way."""
    phase: str = "incoming"
    replayed: int | None = None
    """The last txn id of the source's change log applied to the destination (catchup and
    frozen phases)."""
    switch_version: int | None = None
    """The map version the move under way switches to, chosen before the slots freeze."""
    pauses_ms: list[float] = field(default_factory=list)
    """The write pause of each finished move, in milliseconds."""

    @property
    def move(self) -> Move:
        return self.moves[self.current]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["moves"] = [m.to_json() for m in self.moves]
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReshardState:
        if data.get("format") != FORMAT:
            raise ValueError(f"state file format {data.get('format')!r}, expected {FORMAT}")
        data = {k: v for k, v in data.items() if k != "format"}
        data["moves"] = [Move.from_json(m, data["slots"]) for m in data["moves"]]
        state = cls(**data)
        if state.stage not in STAGES or state.phase not in PHASES:
            raise ValueError(f"unknown stage {state.stage!r} or phase {state.phase!r}")
        return state

    def what(self) -> str:
        """``grow 4 -> 8 shards``, ``shrink 8 -> 4 shards``, ``move of slots 0-127``."""
        if self.kind == "move":
            return "move of slots " + show_slots(frozenset().union(*(m.slots for m in
                                                                      self.moves)))
        return f"{self.kind} {self.old_shards} -> {self.shards} shards"

    def describe(self) -> str:
        if self.stage != "moves":
            return f"{self.what()}, stage {self.stage}"
        return (f"{self.what()}, move {self.current + 1}/{len(self.moves)} "
                f"({self.move.describe()}), phase {self.phase}")


@contextlib.contextmanager
def command_lock(config: Config) -> Iterator[None]:
    """Hold the re-shard lock of ``config``'s service; ReshardError if another command holds
    it."""
    path = config.run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ReshardError(f"another `lmshard reshard` runs for this service (pid "
                               f"{holder or '?'}, lock {path})",
                               hint="wait for it, or stop it; --resume goes on from where it "
                               "stopped") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def load_state(path: Path) -> ReshardState | None:
    """The state in ``path``; None when there is none (no re-shard under way)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ReshardState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a re-shard state file lmshard can read: {exc}") from exc


def save_state(path: Path, state: ReshardState) -> None:
    """Write ``state`` to ``path`` atomically and durably."""
    write_durably(path, (json.dumps(state.to_json(), indent=1) + "\n").encode())
    fsync_dir(path.parent)


def remove_state(path: Path) -> None:
    """The re-shard is over: remove its state file."""
    path.unlink(missing_ok=True)
