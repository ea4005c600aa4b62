"""`lmshard reshard`: the plan, the state file, the config it writes, its refusals, and moves
between real owners: one slot range under supervisord, a grow 2 -> 4 and a shrink back, the
command SIGKILLed at each phase of a move and resumed, a move rolled back.

After every re-shard each shard's environment is read directly: every row must be in the one
shard the map (the shards' own and the config's) gives its slot, and readable through a fresh
client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmshard
from lmshard.config import Config, load_config
from lmshard.errors import BackupError
from lmshard.ops import cli
from lmshard.ops.backup import take_backup
from lmshard.ops.supervise.conf import SupervisorFiles
from lmshard.ops.supervise.rpc import process_infos, shard_of_process
from lmshard.resharding.plan import PlanError, apply_moves, parse_range, plan_range, plan_shards
from lmshard.resharding.service import write_config
from lmshard.resharding.state import ReshardState, command_lock, load_state, save_state, state_path
from lmshard.routing import SlotMap
from lmshard.slot_state import RowSlots, read_slot_state
from lmshard.store import Store
from lmshard.store_meta import read_meta
from tests import schemas
from tests.cluster import Cluster, env_for_children

REPO = Path(__file__).resolve().parent.parent


# -- the plan ----------------------------------------------------------------------------------


def test_grow_gives_each_new_shard_the_upper_half_of_an_old_one() -> None:
    moves = plan_shards(SlotMap(4, 1024), 8, 256)
    assert [(m.source, m.dest, min(m.slots), max(m.slots)) for m in moves] == [
        (0, 4, 128, 255), (1, 5, 384, 511), (2, 6, 640, 767), (3, 7, 896, 1023)]
    assert apply_moves(SlotMap(4, 1024), moves, 8).slot_counts() == [128] * 8


def test_grow_by_one_takes_an_equal_share_from_the_fullest_shards() -> None:
    moves = plan_shards(SlotMap(3, 1024), 4, 256)
    assert {m.dest for m in moves} == {3} and {m.source for m in moves} == {0, 1, 2}
    assert apply_moves(SlotMap(3, 1024), moves, 4).slot_counts() == [256] * 4


def test_shrink_spreads_the_removed_shards_slots_over_the_rest() -> None:
    eight = apply_moves(SlotMap(4, 1024), plan_shards(SlotMap(4, 1024), 8, 256), 8)
    back = apply_moves(eight, plan_shards(eight, 4, 256))
    assert back.slot_counts() == [256] * 4 + [0] * 4
    three = apply_moves(SlotMap(4, 1024), plan_shards(SlotMap(4, 1024), 3, 256))
    assert three.slot_counts() == [342, 341, 341, 0]


def test_bad_requests_are_refused_with_what_is_expected() -> None:
    with pytest.raises(PlanError, match="out of range: expected 1 to 256"):
        plan_shards(SlotMap(4, 1024), 0, 256)
    with pytest.raises(PlanError, match="already"):
        plan_shards(SlotMap(4, 1024), 4, 256)
    for bad in ("9-3", "0-1024", "a-b", "-1"):
        with pytest.raises(PlanError, match="--move"):
            parse_range(bad, 1024)
    with pytest.raises(PlanError, match="--to 4: expected a shard from 0 to 3"):
        plan_range(SlotMap(4, 1024), parse_range("0-9", 1024), 4)
    with pytest.raises(PlanError, match="on shard 0 already"):
        plan_range(SlotMap(4, 1024), parse_range("0-9", 1024), 0)
    moves = plan_range(SlotMap(4, 1024), parse_range("250-260", 1024), 2)
    assert [(m.source, sorted(m.slots)) for m in moves] == [
        (0, list(range(250, 256))), (1, list(range(256, 261)))]


# -- the state file and the config -------------------------------------------------------------


def test_state_file_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "reshard.json"
    state = ReshardState("grow", 4, 8, 1024, plan_shards(SlotMap(4, 1024), 8, 256))
    save_state(path, state)
    state.stage, state.phase, state.replayed, state.current = "moves", "catchup", 17, 2
    save_state(path, state)
    assert load_state(path) == state
    assert not path.with_name("reshard.json.tmp").exists()
    assert load_state(tmp_path / "none.json") is None
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not a re-shard state file"):
        load_state(path)


@pytest.fixture
def init_dir(tmp_path: Path, run_dir: Path) -> Path:
    assert cli.main(["init", str(tmp_path / "svc"), "--shards", "2", "--schema",
                     "tests.schemas:schema", "--python-path", str(REPO), "--run-dir",
                     str(run_dir), "--monitor-http", "127.0.0.1:0"]) == 0
    return tmp_path / "svc" / "lmshard.toml"


def test_config_is_written_with_the_new_map_and_version(init_dir: Path) -> None:
    config = load_config(init_dir)
    wide = SlotMap(4, config.slots, config.slot_map.assignment, empty_ok=True)
    written = write_config(config, wide, 3)
    again = load_config(init_dir)
    assert (again.shards, again.slot_map, again.slot_map_version) == (4, wide, 3)
    assert written.slot_map == wide and again.data_dir == config.data_dir
    assert "version = 3" in init_dir.read_text()
    assert (init_dir.parent / "lmshard.toml.old").read_text().count("shards = 2") == 1


def test_reshard_refuses_bad_usage_and_a_reshard_under_way(init_dir: Path,
                                                          capsys: Any) -> None:
    config = load_config(init_dir)
    assert cli.main(["reshard", "--move", "5-1", "--to", "1", "-c", str(init_dir)]) == 2
    assert "expected 0 <= FIRST <= LAST <= 1023" in capsys.readouterr().err
    assert cli.main(["reshard", "--shards", "999", "-c", str(init_dir)]) == 2
    assert "out of range: expected 1 to 256" in capsys.readouterr().err
    assert cli.main(["reshard", "--shards", "4", "-c", str(init_dir)]) == 1
    assert "adding shards needs the service under supervisord" in capsys.readouterr().err
    assert cli.main(["reshard", "--shards", "1", "-c", str(init_dir)]) == 1
    assert "removing shards needs the service under supervisord" in capsys.readouterr().err
    listed = init_dir.read_text().replace(
        'endpoint = "ipc://{run_dir}/shard-{shard:02d}.sock"',
        f'endpoint = ["ipc://{config.run_dir}/a.sock", "ipc://{config.run_dir}/b.sock"]')
    init_dir.write_text(listed)
    assert cli.main(["reshard", "--shards", "4", "-c", str(init_dir)]) == 2
    assert "has 2 endpoints; expected one per shard (4)" in capsys.readouterr().err
    init_dir.write_text(listed.replace(f'["ipc://{config.run_dir}/a.sock", '
                                       f'"ipc://{config.run_dir}/b.sock"]',
                                       '"ipc://{run_dir}/shard-{shard:02d}.sock"'))
    # No owner runs: said at once, nothing written.
    assert cli.main(["reshard", "--move", "0-9", "--to", "1", "-c", str(init_dir)]) == 1
    assert "does not answer" in capsys.readouterr().err
    assert not state_path(config).exists()
    save_state(state_path(config), ReshardState("move", 2, 2, 1024,
                                                plan_range(config.slot_map,
                                                           frozenset(range(10)), 1)))
    assert cli.main(["reshard", "--shards", "4", "-c", str(init_dir)]) == 1
    err = capsys.readouterr().err
    assert "a re-shard is under way" in err and "--resume" in err
    with pytest.raises(BackupError, match="a re-shard is under way"):
        take_backup(config, init_dir.parent / "backups")
    with command_lock(config):
        assert cli.main(["reshard", "--resume", "-c", str(init_dir)]) == 1
    assert f"another `lmshard reshard` runs for this service (pid {os.getpid()}" in \
        capsys.readouterr().err
    assert cli.main(["reshard", "--status", "-c", str(init_dir)]) == 0
    out = capsys.readouterr().out
    assert "re-shard under way: move of slots 0-9, stage start" in out and "does not answer" in out


# -- rows and where they are -------------------------------------------------------------------


def fill(config: Config, n: int = 60) -> dict[tuple[str, Any], Any]:
    """Rows in tables of every placement: indexed (items), pinned with a unique index
    (users), shard_key function (events), shard_key=1 (readings), plain (records)."""
    rows: dict[tuple[str, Any], Any] = {}
    with lmshard.connect(config, schemas.schema) as c:
        with c.batch() as b:
            for i in range(n):
                for table, key, value in (
                    ("items", i, {"group": i % 5, "n": i}),
                    ("users", uuid.UUID(int=i + 1), {"email": f"u{i}@x", "n": i}),
                    ("events", (f"s{i % 7}", i), {"n": i}),
                    ("readings", (f"r{i % 9}", i), {"n": i}),
                    ("records", i, {"n": i}),
                ):
                    b.put(table, key, value)
                    rows[table, key] = value
    return rows


def change(config: Config, rows: dict[tuple[str, Any], Any]) -> None:
    """Update, delete and add rows (what a catch-up must replay)."""
    with lmshard.connect(config, schemas.schema) as c:
        for i in range(0, 60, 3):
            c.put("items", i, {"group": 9, "n": -i})
            rows["items", i] = {"group": 9, "n": -i}
            c.delete("records", i)
            del rows["records", i]
            c.put("events", ("new", i), {"n": i})
            rows["events", ("new", i)] = {"n": i}


def delete_copied(config: Config, rows: dict[tuple[str, Any], Any], slots: range) -> int:
    """Delete (at their owner) the rows of ``slots`` a killed move copied to shard 1 already:
    the move's next attempt must not leave them there."""
    slot_map = config.slot_map
    keys = []
    with Store(config.shard_dir(1), config.load_schema(), readonly=True) as store, \
            store.read() as r:
        row_slots = RowSlots(slot_map)
        for b in store.tables.by_tid.values():
            keys += [(b.name, b.kdec(bytes(kb))) for kb, _ in r.txn.cursor(db=b.db)
                     if row_slots.slot(b, bytes(kb)) in slots]
    with lmshard.connect(config, schemas.schema) as c:
        for table, key in keys:
            c.delete(table, key)
            del rows[table, key]
    return len(keys)


def check_rows(config: Config, rows: dict[tuple[str, Any], Any]) -> SlotMap:
    """Every shard records the config's map; each row is in the shard its slot is on, once;
    a fresh client reads every row, the index and the count. The map."""
    config = load_config(config.path)
    slot_map = config.slot_map
    schema = config.load_schema()
    found: dict[tuple[str, Any], int] = {}
    for n in range(config.shards):
        meta = read_meta(config.shard_dir(n))
        assert meta is not None
        st = read_slot_state(meta, config)
        assert (st.version, st.map, st.moving) == (config.slot_map_version, slot_map, False)
        slots = RowSlots(slot_map)
        with Store(config.shard_dir(n), schema, readonly=True) as store, store.read() as r:
            for b in store.tables.by_tid.values():
                for kb, _ in r.txn.cursor(db=b.db):
                    kb = bytes(kb)
                    assert slot_map.assignment[slots.slot(b, kb)] == n, (b.name, n)
                    key = (b.name, b.kdec(kb))
                    assert key not in found, f"{key} on shards {found[key]} and {n}"
                    found[key] = n
    assert set(found) == set(rows)
    counts = [0] * config.shards
    for shard in found.values():
        counts[shard] += 1
    assert all(counts[n] == 0 for n in range(config.shards) if n not in slot_map.assignment)
    with lmshard.connect(config, schemas.schema) as c:
        for (table, key), value in rows.items():
            assert c.get(table, key) == value, (table, key)
        assert c.count("items") == len([k for k in rows if k[0] == "items"])
        assert len(c.lookup("items", "by_group", 3)) == len(
            [k for k, v in rows.items() if k[0] == "items" and v["group"] == 3])
        for key, value in [(k, v) for k, v in rows.items() if k[0] == "users"][:5]:
            assert [k for k, _ in c.lookup("users", "by_email", value["email"])] == [key[1]]
    return slot_map


# -- moves between real owners -----------------------------------------------------------------


def reshard(config_path: Path, *args: str, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """``lmshard reshard ARGS -c CONFIG`` as an operator runs it."""
    done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "reshard", *args, "-c",
                           str(config_path)], capture_output=True, text=True, timeout=timeout,
                          env=env_for_children(), stdin=subprocess.DEVNULL)
    return done


@pytest.fixture
def supervised(init_dir: Path) -> Iterator[Path]:
    done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "up", "-c", str(init_dir)],
                          capture_output=True, text=True, timeout=120, env=env_for_children())
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield init_dir
    finally:
        subprocess.run([sys.executable, "-m", "lmshard.ops.cli", "down", "-c", str(init_dir)],
                       capture_output=True, timeout=120, env=env_for_children())


def test_move_a_slot_range_under_supervisord(supervised: Path) -> None:
    config = load_config(supervised)
    rows = fill(config)
    done = reshard(supervised, "--move", "100-400", "--to", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "move 1/1 done: writes to slots 100-400 paused" in done.stdout
    after = load_config(supervised)
    assert after.slot_map_version == 1 and after.shards == 2
    assert after.slot_map.slots_of(1) == list(range(100, 401)) + list(range(512, 1024))
    check_rows(after, rows)
    assert not state_path(after).exists()
    status = reshard(supervised, "--status")
    assert "no re-shard under way" in status.stdout
    assert "shard 1   version 1      813 slots" in status.stdout, status.stdout


def owner_pids(config_path: Path) -> dict[str, int]:
    """Every shard owner supervisord runs, by name, with its pid (0: stopped)."""
    infos = process_infos(SupervisorFiles.read(config_path.parent / "supervisord.conf"))
    return {i["fullname"]: i["pid"] for i in infos if shard_of_process(i) is not None}


def test_grow_two_to_four_and_shrink_back(supervised: Path) -> None:
    config = load_config(supervised)
    rows = fill(config)
    before = owner_pids(supervised)
    done = reshard(supervised, "--shards", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    grown = check_rows(load_config(supervised), rows)
    assert grown.shards == 4 and grown.slot_counts() == [256] * 4
    pids = owner_pids(supervised)
    assert {k: pids[k] for k in before} == before, "a running owner was restarted"
    assert sorted(pids) == ["lmshard:shard_00", "lmshard:shard_01", "lmshard_02:shard_02",
                            "lmshard_03:shard_03"] and all(pids.values())
    assert cli.main(["status", "-c", str(supervised)]) == 0
    done = reshard(supervised, "--shards", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    after = load_config(supervised)
    assert after.shards == 2 and after.slot_map.slot_counts() == [512, 512]
    check_rows(after, rows)
    assert owner_pids(supervised) == before
    assert sorted(p.name for p in after.data_dir.iterdir()) == [
        "shard-00", "shard-01", f"shard-02.removed-{after.slot_map_version}",
        f"shard-03.removed-{after.slot_map_version}"]
    assert not list((supervised.parent / "supervisord.d").glob("*.conf"))


KILL_AT = """
import os, signal, sys
from lmshard.resharding import mover, run, state
from lmshard.resharding.admin import OwnerAdmin
kind, at = sys.argv[1], sys.argv[2]
mover.PAGE_OPS = 10
def die():
    os.kill(os.getpid(), signal.SIGKILL)
save = state.save_state
def save_then_die(path, st):
    save(path, st)
    if kind == "phase" and st.stage == "moves" and st.phase == at:
        die()
run.save_state = save_then_die
calls = {"record": 0, "move_rows": 0}
def then_die(name, method):
    def call(self, shard, arg):
        out = method(self, shard, arg)
        calls[name] += 1
        if kind == name and calls[name] == int(at):
            die()
        return out
    return call
OwnerAdmin.record = then_die("record", OwnerAdmin.record)
OwnerAdmin.move_rows = then_die("move_rows", OwnerAdmin.move_rows)
from lmshard.ops import cli
sys.exit(cli.main(sys.argv[3:]))
"""
"""``lmshard`` run with a SIGKILL to itself at a point: ``phase P`` (once the state file
says P), ``record N`` (after the N-th slot state it recorded), ``move_rows N`` (after the N-th
batch of rows it moved; 10 rows a batch)."""


@pytest.fixture
def owners(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "owners", shards=2, sync=False)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def killed_at(config_path: Path, kind: str, at: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILL_AT, kind, at, "reshard",
                           "--move", "0-300", "--to", "1", "-c", str(config_path)],
                          capture_output=True, text=True, timeout=120, env=env_for_children())
    assert done.returncode == -9, done.stdout + done.stderr


@pytest.mark.parametrize("kind, at", [
    ("phase", "copy"), ("phase", "catchup"), ("phase", "frozen"), ("phase", "switch"),
    ("phase", "drop"),
    ("move_rows", "3"),  # half-way through the copy
    ("record", "4"),  # after the destination and the source switched, before the rest
])
def test_killed_mid_move_then_resume_leaves_every_row_in_one_shard(
        owners: Cluster, kind: str, at: str) -> None:
    rows = fill(owners.config)
    killed_at(owners.config_path, kind, at)
    state = load_state(state_path(owners.config))
    assert state is not None
    phase = state.phase
    if phase in ("copy", "catchup"):  # not frozen yet: writes go on
        change(owners.config, rows)
    if kind == "move_rows":
        assert delete_copied(owners.config, rows, range(0, 301)) == 30
    if kind != "phase":  # and an owner restarted meanwhile
        owners.kill(0)
        owners.start(0)
    done = reshard(owners.config_path, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    after = check_rows(owners.config, rows)
    assert after.slots_of(1) == list(range(0, 301)) + list(range(512, 1024))


def test_rollback_of_an_unswitched_move(owners: Cluster) -> None:
    rows = fill(owners.config)
    killed_at(owners.config_path, "phase", "frozen")
    done = reshard(owners.config_path, "--rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rolled back the move of slots 0-300" in done.stdout
    after = check_rows(owners.config, rows)
    assert after == owners.config.slot_map and not state_path(owners.config).exists()
    # A switched move cannot be rolled back; --resume finishes it.
    killed_at(owners.config_path, "phase", "drop")
    done = reshard(owners.config_path, "--rollback")
    assert done.returncode == 1 and "can no longer be rolled back" in done.stderr
    assert reshard(owners.config_path, "--resume").returncode == 0
    check_rows(owners.config, rows)


def test_backup_refused_while_a_shard_records_moving_slots(owners: Cluster,
                                                           tmp_path: Path) -> None:
    fill(owners.config)
    killed_at(owners.config_path, "phase", "catchup")
    path = state_path(owners.config)
    with pytest.raises(BackupError, match="a re-shard is under way"):
        take_backup(owners.config, tmp_path / "backups")
    path.rename(tmp_path / "aside.json")  # the state file lost: the shards still tell
    with pytest.raises(BackupError, match="shard 1 records slot map version 0 \\(incoming 0-300"):
        take_backup(owners.config, tmp_path / "backups")
    assert not any((tmp_path / "backups").iterdir())
    (tmp_path / "aside.json").rename(path)
    assert reshard(owners.config_path, "--rollback").returncode == 0
    assert take_backup(owners.config, tmp_path / "backups").path.exists()


@pytest.mark.slow
def test_added_owner_folded_into_group_lmshard_by_up_then_removed(supervised: Path) -> None:
    rows = fill(load_config(supervised))
    assert reshard(supervised, "--shards", "3").returncode == 0
    assert "lmshard_02:shard_02" in owner_pids(supervised)
    for args in (["down"], ["up"]):
        done = subprocess.run([sys.executable, "-m", "lmshard.ops.cli", *args, "-c",
                               str(supervised)], capture_output=True, text=True, timeout=120,
                              env=env_for_children())
        assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(owner_pids(supervised)) == [f"lmshard:shard_{n:02d}" for n in range(3)]
    assert not list((supervised.parent / "supervisord.d").glob("*.conf"))
    check_rows(load_config(supervised), rows)
    kept = {k: v for k, v in owner_pids(supervised).items() if k != "lmshard:shard_02"}
    done = reshard(supervised, "--shards", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert owner_pids(supervised) == {**kept, "lmshard:shard_02": 0}  # stopped, not restarted
    assert "numprocs=2" in (supervised.parent / "supervisord.conf").read_text()
    check_rows(load_config(supervised), rows)
