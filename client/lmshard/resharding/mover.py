"""One move of a re-shard: slots S from shard A to shard B while both serve (docs/resharding.md).

1. B records S as ``incoming`` (its version unchanged).
2. Rows of S left on B by an interrupted attempt are deleted (``move_rows``).
3. P = the txn id of a read snapshot of A's environment; the rows of S in it are copied to B
   (``move_rows`` puts, a page at a time).
4. A's change log from P + 1 is replayed into B for the rows of S until B is close behind.
5. A records S as ``frozen`` (its writes to S wait, answered SlotsMoving) at txn F; the log is
   replayed up to F.
6. Switch: V = the highest version any shard records + 1, M' = the map with S on B. B records
   (V, M', incoming - S), then A (V, M', frozen - S, outgoing + S), then every other shard
   (V, M'). Writes to S waited from step 5 to A's switch: the move's write pause.
7. The rows of S are deleted from A (``move_rows``); A records outgoing - S.

A's environment is read directly (every shard's home copy lives under ``data_dir`` on this
host), so neither owner spends time on the copy beyond applying B's batches. The phase is
written to the state file before each step; ``resume`` goes on from it, ``rollback`` undoes a
move that has not switched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from lmshard.changes import CLIENTS_TABLE_ID, SLOTS_TABLE_ID, record_effects
from lmshard.config import Config
from lmshard.protocol.ops import OP_DELETE, OP_PUT
from lmshard.resharding import ReshardError
from lmshard.resharding.admin import OwnerAdmin
from lmshard.resharding.plan import Move
from lmshard.resharding.state import PHASES, SWITCHED, ReshardState
from lmshard.routing import SlotMap
from lmshard.schema import Schema
from lmshard.slot_state import RowSlots, SlotState
from lmshard.store import Store

PAGE_OPS = 1000
"""Most rows one ``move_rows`` batch carries."""
PAGE_BYTES = 1 << 20
"""Most bytes of rows one ``move_rows`` batch carries (one row more may pass it)."""
CLOSE_BEHIND = 64
"""Change-log records B may be behind A when the slots freeze: the catch-up stops at fewer."""
CATCHUP_ROUNDS = 50
"""Rounds of catch-up before the slots freeze whatever the gap (a source writing faster than
the catch-up replays): the rest is replayed while frozen."""

Report = Callable[[str, int, int], None]
"""Progress of a move: ``(what, done, total)``; total 0 while unknown, ``done == total`` when
the step is done. Rows for the copy and the deletes, txn ids for the catch-up."""


class MoveError(ReshardError):
    """A move could not go on; the message says why and how to go on."""

    hint = "`lmshard reshard --status` shows where it stopped; --resume goes on, --rollback " \
           "undoes a move that has not switched"


class Mover:
    """Carries out the moves of ``state`` (saving it through ``save`` before each phase)."""

    def __init__(self, config: Config, schema: Schema, admin: OwnerAdmin, state: ReshardState,
                 save: Callable[[], None], report: Report, say: Callable[[str], None]) -> None:
        self.config = config
        self.schema = schema
        self.admin = admin
        self.state = state
        self.save = save
        self.report = report
        self.say = say
        self._stores: dict[int, Store] = {}

    def close(self) -> None:
        for st in self._stores.values():
            st.close()
        self._stores.clear()

    def store(self, shard: int) -> Store:
        """Shard ``shard``'s environment, opened read-only (its owner writes it)."""
        st = self._stores.get(shard)
        if st is None:
            st = self._stores[shard] = Store(self.config.shard_dir(shard), self.schema,
                                             readonly=True, max_readers=self.config.max_readers)
        return st

    def _phase(self, phase: str) -> None:
        self.state.phase = phase
        self.save()

    # -- one move -------------------------------------------------------------------------------

    def run(self, move: Move) -> float:
        """Carry out (or go on with) ``move`` from the state's phase; its write pause in ms
        (measured from where it went on, when it went on after the freeze)."""
        s = self.state
        pause_from: float | None = None
        if s.phase in ("incoming", "copy") or (
                s.phase in ("catchup", "frozen")
                and (s.replayed is None or not self._log_holds(move.source, s.replayed + 1))):
            if s.phase == "frozen":  # its writes wait no longer than the copy takes
                self._update(move.source, unfreeze=move.slots)
            self._phase("incoming")
            self._update(move.dest, incoming=move.slots)
            self._phase("copy")
            self._delete_all(move.dest, move.slots, "clean")
            s.replayed = self._copy(move)
            self._phase("catchup")
        if s.phase == "catchup":
            self._catch_up(move, until=None)
            # Chosen before the freeze, so the pause is not spent on it (only this command
            # records versions: it holds the re-shard lock).
            s.switch_version = max(st.version for st in self._all_states().values()) + 1
            self._phase("frozen")
        if s.phase == "frozen":
            if pause_from is None:
                pause_from = time.perf_counter()
            frozen_at = self._update(move.source, frozen=move.slots)
            self._catch_up(move, until=frozen_at)
            self._phase("switch")
        if s.phase == "switch":
            pause_ms = self._switch(move, pause_from)
            s.pauses_ms.append(pause_ms)
            self._phase("drop")
        if s.phase == "drop":
            self._delete_all(move.source, move.slots, "drop")
            self._update(move.source, drop_outgoing=move.slots)
            self._phase("done")
        return s.pauses_ms[-1] if s.pauses_ms else 0.0

    def rollback(self, move: Move) -> None:
        """Undo ``move`` (not switched yet): unfreeze the source, delete the copied rows on
        the destination, clear its incoming slots."""
        if PHASES.index(self.state.phase) >= SWITCHED:
            raise MoveError(f"the move of {move.describe()} has switched (phase "
                            f"{self.state.phase}): it can no longer be rolled back",
                            hint="finish it with `lmshard reshard --resume`")
        self._update(move.source, unfreeze=move.slots)
        self._delete_all(move.dest, move.slots, "rollback")
        self._update(move.dest, drop_incoming=move.slots)

    # -- steps ----------------------------------------------------------------------------------

    def _all_states(self) -> dict[int, SlotState]:
        return self.admin.states(range(max(self.state.shards, self.state.old_shards)))

    def _update(self, shard: int, *, incoming: frozenset[int] = frozenset(),
                frozen: frozenset[int] = frozenset(), unfreeze: frozenset[int] = frozenset(),
                drop_incoming: frozenset[int] = frozenset(),
                drop_outgoing: frozenset[int] = frozenset()) -> int:
        """Record a change of shard ``shard``'s moving slots at its own version; the txn id of
        the record (the shard's last txn id when nothing changed)."""
        st, txn = self.admin.state(shard)
        new = replace(st, incoming=(st.incoming | incoming) - drop_incoming,
                      frozen=(st.frozen | frozen) - unfreeze,
                      outgoing=st.outgoing - drop_outgoing)
        if new == st:
            return txn
        return self.admin.record(shard, new)

    def _rows(self, shard: int, slots: frozenset[int], slot_map: SlotMap, *,
              values: bool = True) -> Iterator[tuple[int, list[list[Any]]]]:
        """Pages of ``[put, table id, key, stored row]`` (``values`` False: ``[delete, table
        id, key, nil]``) for the rows of ``slots`` in one read snapshot of ``shard``, each
        with the snapshot's txn id."""
        st = self.store(shard)
        row_slots = RowSlots(slot_map)
        with st.read() as r:
            txn = r.txn
            snapshot = txn.id()
            page: list[list[Any]] = []
            size = 0
            for b in st.tables.by_tid.values():
                for kb, vb in txn.cursor(db=b.db):
                    kb = bytes(kb)
                    if row_slots.slot(b, kb) not in slots:
                        continue
                    page.append([OP_PUT, b.tid, kb, bytes(vb)] if values
                                else [OP_DELETE, b.tid, kb, None])
                    size += len(kb) + (len(vb) if values else 0)
                    if len(page) >= PAGE_OPS or size >= PAGE_BYTES:
                        yield snapshot, page
                        page, size = [], 0
            if page:
                yield snapshot, page

    def _copy(self, move: Move) -> int:
        """Step 3: copy the rows of the move's slots from a snapshot of the source; the
        snapshot's txn id."""
        slot_map = self.admin.state(move.source)[0].map
        snapshot = None
        done = 0
        for snap, page in self._rows(move.source, move.slots, slot_map):
            snapshot = snap
            self.admin.move_rows(move.dest, page)
            done += len(page)
            self.report("copy", done, 0)
        self.report("copy", done, done)
        if snapshot is None:
            with self.store(move.source).read() as r:
                snapshot = int(r.txn.id())
        return snapshot

    def _delete_all(self, shard: int, slots: frozenset[int], what: str) -> None:
        """Delete every row of ``slots`` from ``shard`` (step 2, step 7, a rollback), page by
        page from a snapshot, until a snapshot holds none."""
        slot_map = self.admin.state(shard)[0].map
        done = 0
        while True:
            before = done
            for _, ops in self._rows(shard, slots, slot_map, values=False):
                self.admin.move_rows(shard, ops)
                done += len(ops)
                self.report(what, done, 0)
            if done == before:
                self.report(what, done, done)
                return

    def _log_holds(self, shard: int, txn_id: int) -> bool:
        """Whether ``shard``'s change log still holds every record from ``txn_id`` on."""
        st = self.store(shard)
        log = st.changes
        if log is None or log.db is None:
            return False
        with st.read() as r:
            log.refresh(r.txn)
        return log.enabled and log.floor <= txn_id

    def _catch_up(self, move: Move, until: int | None) -> None:
        """Step 4 (``until`` None: until close behind) and step 5 (up to txn ``until``):
        replay the source's change log into the destination for the rows of the move's slots,
        saving the position after each batch the destination applied (step 5: once, with the
        switch phase that follows, so the write pause is not spent on it; a resume from
        ``frozen`` replays the same records again, which ends the same)."""
        st = self.store(move.source)
        log = st.changes
        assert log is not None
        slot_map = self.admin.state(move.source)[0].map
        row_slots = RowSlots(slot_map)
        by_tid = st.tables.by_tid
        for _round in range(CATCHUP_ROUNDS if until is None else 1 << 30):
            start = (self.state.replayed or 0) + 1
            self._check_log_holds(move.source, start)
            with st.read() as r:
                records = log.read(r.txn, start, max_records=256)
                last = int(r.txn.id())
            if until is not None:
                records = [(t, rec) for t, rec in records if t <= until]
            ops = replay_ops(records, by_tid, row_slots, move.slots)
            if ops:
                self.admin.move_rows(move.dest, ops)
            if records:
                self.state.replayed = records[-1][0]
                if until is None:  # while frozen, saved once with the switch phase instead
                    self.save()
            behind = last - (self.state.replayed or 0)
            self.report("catch-up" if until is None else "frozen catch-up",
                        self.state.replayed or 0, last if until is None else until)
            if until is not None:
                if not records or records[-1][0] >= until:
                    if (self.state.replayed or 0) < until:
                        self.state.replayed = until
                    return
            elif len(records) < CLOSE_BEHIND and behind < CLOSE_BEHIND:
                return

    def _check_log_holds(self, shard: int, txn_id: int) -> None:
        if not self._log_holds(shard, txn_id):
            raise MoveError(f"shard {shard}'s change log no longer holds txn {txn_id}: the "
                            "copy fell behind its retention",
                            hint="run `lmshard reshard --resume`: the move starts its copy "
                            "again; raise [changes] retain if it happens again")

    def _switch(self, move: Move, pause_from: float | None) -> float:
        """Step 6: record version V with the slots on the destination: the destination, the
        source, then every other shard. The write pause in ms."""
        v = self.state.switch_version
        assert v is not None
        dest, source = self.admin.state(move.dest)[0], self.admin.state(move.source)[0]
        latest = max(dest, source, key=lambda st: st.version).map
        table = list(latest.assignment)
        for slot in move.slots:
            table[slot] = move.dest
        new_map = SlotMap(latest.shards, latest.slots, table, empty_ok=True)

        def switch(shard: int, st: SlotState, **sets: frozenset[int]) -> None:
            want = replace(st, version=v, map=new_map, **sets)
            if st != want and st.version <= v:
                self.admin.record(shard, want)

        switch(move.dest, dest, incoming=dest.incoming - move.slots)
        switch(move.source, source, frozen=source.frozen - move.slots,
               outgoing=source.outgoing | move.slots)
        pause_ms = (time.perf_counter() - pause_from) * 1000 if pause_from else 0.0
        for shard, st in self._all_states().items():
            if shard not in (move.source, move.dest):
                switch(shard, st)
        return pause_ms


def replay_ops(records: list[tuple[int, bytes]], by_tid: dict[bytes, Any], row_slots: RowSlots,
               slots: frozenset[int]) -> list[list[Any]]:
    """The ``move_rows`` ops that replay the changes of change-log ``records`` to rows of
    ``slots`` (client records and slot states are the source's own, and left out)."""
    ops: list[list[Any]] = []
    for _tid, record in records:
        for e in record_effects(record):
            tid = e[0]
            if tid == CLIENTS_TABLE_ID or tid == SLOTS_TABLE_ID:
                continue
            b = by_tid.get(tid)
            if b is None or row_slots.slot(b, e[1]) not in slots:
                continue
            ops.append([OP_DELETE, tid, e[1], None] if e[2] is None
                       else [OP_PUT, tid, e[1], e[2]])
    return ops
