"""Replicas (``lmshardd replica``): real owners, real replica processes, real LMDB copies.

A replica of each shard follows a writer load and ends row for row identical to its primary
(every table and index database); SIGKILLed mid-stream it resumes; stopped while the primary's
log is trimmed past it, it takes a new snapshot into its live environment while another process
reads it; ``lmshard failover`` promotes it, and the home owner restarted afterwards rejoins as
its replica.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

from lmshard import protocol
from lmshard.changes import CHANGES_DB
from lmshard.config import Config
from lmshard.copies import ping_copies
from lmshard.errors import ReplicaTimeout
from lmshard.local_service import terminate
from lmshard.named_dbs import named_dbs
from lmshard.store import Store
from lmshard.store_meta import MAX_DBS, META_DB
from tests.cluster import Cluster, env_for_children, lmshard_cli, wait_for
from tests.schemas import schema

R = "r1"


class Replicas:
    """``lmshardd replica --shard N --name R`` processes for every shard of a service."""

    def __init__(self, svc: Cluster, name: str = R) -> None:
        self.svc = svc
        self.name = name
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def config(self) -> Config:
        return self.svc.config

    def start(self, shard: int | None = None) -> None:
        for s in range(self.config.shards) if shard is None else [shard]:
            log = self.svc.base / f"replica-{self.name}-{s:02d}.log"
            with open(log, "ab") as out:
                self.procs[s] = subprocess.Popen(
                    [sys.executable, "-m", "lmshardd.main", "-c", str(self.svc.config_path),
                     "replica", "--shard", str(s), "--name", self.name],
                    stdout=out, stderr=subprocess.STDOUT, env=env_for_children())

    def log(self, shard: int) -> str:
        return (self.svc.base / f"replica-{self.name}-{shard:02d}.log").read_text()

    def kill(self, shard: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[shard]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        terminate(self.procs.values())


def health(config: Config, shard: int, member: str) -> dict[str, Any] | None:
    return ping_copies(config, shard, [member], timeout=2.0)[member].health


def following(config: Config, shard: int, member: str = R) -> bool:
    return (health(config, shard, member) or {}).get("state") == "following"


def caught_up(config: Config, shard: int, member: str = R, primary: str = "home") -> bool:
    """The replica follows and has applied everything its primary committed."""
    p, r = health(config, shard, primary), health(config, shard, member)
    return bool(p and r and r.get("state") == "following" and r["applied"] >= p["txn_id"])


def copy_contents(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every named database of the copy at ``path`` but its change log and meta database:
    the tables, their indexes and expiry indexes, and the clients' records."""
    skip = {CHANGES_DB, META_DB}
    env = lmdb.open(str(path), readonly=True, max_dbs=MAX_DBS, lock=False)
    out = {}
    try:
        with env.begin() as txn:
            main = env.open_db(None, txn=txn)
            for db in named_dbs(txn, main):
                if db.name in skip:
                    continue
                handle = env.open_db(db.name, txn=txn, create=False, **db.open_flags)
                out[db.name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=handle)]
    finally:
        env.close()
    return out


def assert_identical(config: Config, shard: int, member: str = R, primary: str = "home"
                     ) -> int:
    """The two copies hold the same rows in every database; how many rows."""
    a = copy_contents(config.member(shard, primary).dir)
    b = copy_contents(config.member(shard, member).dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"shard {shard}: database {name!r} differs"
    return sum(len(v) for v in a.values())


class Load(threading.Thread):
    """A writer: puts, increments, deletes and batches over tables with and without indexes."""

    def __init__(self, svc: Cluster) -> None:
        super().__init__(daemon=True)
        self.svc = svc
        self.stop = threading.Event()
        self.batches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.svc.client() as c:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    with c.batch() as b:
                        for j in range(5):
                            b.put("items", i * 10 + j, {"group": (i + j) % 7, "i": i})
                        b.put("events", (f"s{i % 5}", i), {"v": i})
                    c.put("users", uuid.uuid4(), {"email": f"u{i}@x.org", "n": i})
                    c.incr("counters", f"c{i % 11}")
                    if i % 3 == 0:
                        c.delete("items", (i - 2) * 10)
                    self.batches += 1
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        assert self.error is None, self.error


@pytest.fixture
def svc(tmp_path: Path) -> Any:
    s = Cluster(tmp_path, shards=2, replica_names=[R], replica_data_dir=str(tmp_path / "rep"))
    s.start()
    reps = Replicas(s)
    try:
        yield s, reps
    finally:
        reps.stop()
        s.stop()


def request(endpoint: str, frame: bytes, timeout: float = 5.0) -> list[Any]:
    """One request on a DEALER to ``endpoint``: the reply ``[seq, status, body]``."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(frame)
        assert sock.poll(int(timeout * 1000)), f"no answer from {endpoint}"
        return protocol.unpack_frame(sock.recv())
    finally:
        sock.close()


def put_frame(seq: int, key: str, value: int) -> bytes:
    t = schema.tables["counters"]
    ops = [protocol.op(protocol.OP_PUT, t.table_id.bytes, t.key.encode(key),
                       t.value.dumps(value))]
    return protocol.WRITE.frame(uuid.uuid4().bytes, seq, ops)


def test_replica_follows_a_writer_load_and_ends_identical(svc: Any) -> None:
    s, reps = svc
    with s.client() as c:  # rows before the snapshot, and rows after it
        for i in range(50):
            c.put("items", 100_000 + i, {"group": i % 3, "i": i})
    reps.start()
    for shard in range(2):
        wait_for(f"replica of shard {shard} following", partial(following, s.config, shard))
    load = Load(s)
    load.start()
    time.sleep(3)
    load.finish()
    assert load.batches > 20
    for shard in range(2):
        wait_for(f"replica of shard {shard} caught up", partial(caught_up, s.config, shard))
    r0 = health(s.config, 0, R)
    assert r0 is not None
    assert (r0["member"], r0["role"], r0["primary"], r0["epoch"]) == (R, "replica", "home", 1)
    assert r0["lag_txns"] == 0 and r0["applied_txns"] > 0
    # The replica answers reads from its copy, and refuses writes naming its primary.
    member = s.config.member(0, R)
    count = request(member.endpoint, protocol.COUNT.frame(
        None, 7, schema.tables["items"].table_id.bytes, None, None))
    assert count[1] == 0 and count[2] > 0
    refused = request(member.endpoint, put_frame(3, "x", 1))
    assert refused[1] == 90 and refused[2][2:] == ["home", 1]
    copies = lmshard_cli("copies", "-c", str(s.config_path))
    assert copies.returncode == 0, copies
    lines = [line.split() for line in copies.stdout.splitlines()]
    assert [(ln[1], ln[2], ln[3]) for ln in lines] == [
        ("0", "home", "primary"), ("0", R, "replica"), ("1", "home", "primary"),
        ("1", R, "replica")]
    assert all("caught up" in line for line in copies.stdout.splitlines()[1::2])
    reps.stop()
    s.stop()
    rows = [assert_identical(s.config, shard) for shard in range(2)]
    assert sum(rows) > load.batches * 5


@pytest.mark.slow
def test_replica_killed_mid_stream_resumes(svc: Any) -> None:
    s, reps = svc
    reps.start()
    load = Load(s)
    load.start()
    for _ in range(3):
        time.sleep(1.0)
        reps.kill(0)
        time.sleep(0.3)
        reps.start(0)
    time.sleep(1.0)
    load.finish()
    for shard in range(2):
        wait_for(f"replica of shard {shard} caught up", partial(caught_up, s.config, shard))
    # It resumed from its own applied txn: one snapshot, ever (the first start's).
    assert reps.log(0).count("taking a snapshot of") == 1, reps.log(0)
    reps.stop()
    s.stop()
    for shard in range(2):
        assert_identical(s.config, shard)


READER = textwrap.dedent("""
    import sys, time, lmshard
    from tests.schemas import schema
    store = lmshard.open(sys.argv[1], schema, readonly=True)
    print("open", store.count("items"), flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        print("count", store.count("items"), store.get("items", 777_777), flush=True)
""")


@pytest.mark.slow
def test_replica_past_the_log_resnapshots_into_its_live_copy(tmp_path: Path) -> None:
    s = Cluster(tmp_path, shards=1, replica_names=[R], replica_data_dir=str(tmp_path / "rep"),
                changes_retain="16KiB")
    s.start()
    reps = Replicas(s)
    reader = None
    try:
        reps.start()
        with s.client() as c:
            for i in range(20):
                c.put("items", i, {"group": 1, "i": i})
        wait_for("replica caught up", lambda: caught_up(s.config, 0))
        reps.stop()
        # A process on the replica host keeps the copy open (mapped) and reads it.
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(s.config.member(0, R).dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_for_children())
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().split() == ["open", "20"]
        with s.client() as c:  # far more than the log keeps
            for i in range(400):
                c.put("items", 1000 + i, {"group": 2, "i": i, "pad": "x" * 200})
            c.put("items", 777_777, {"group": 3, "i": 0})
            for i in range(10):  # rows the stale copy still has: the new snapshot drops them
                c.delete("items", i)
            floor = c.stats()["shards"][0]["changes"]["floor"]
        applied = health_applied_on_disk(s.config)
        assert floor > applied + 1, "the log was not trimmed past the stopped replica"
        reps.start()
        wait_for("replica caught up", lambda: caught_up(s.config, 0))
        assert "taking a new snapshot" in reps.log(0)
        reader.stdin.write("\n")
        reader.stdin.flush()
        line = reader.stdout.readline().split()
        assert line[:2] == ["count", "411"] and line[2] != "None", line
        reps.stop()
        s.stop()
        assert_identical(s.config, 0)
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
        reps.stop()
        s.stop()


def health_applied_on_disk(config: Config) -> int:
    """The replica's ``replica_applied`` as its copy records it (the replica is stopped)."""
    from lmshardd.membership import read_member_state

    state, exists = read_member_state(config.member(0, R).dir, R)
    assert exists
    return state.applied


@pytest.mark.slow
def test_failover_promotes_the_replica_and_the_old_owner_rejoins(svc: Any) -> None:
    s, reps = svc
    reps.start(0)
    with s.client() as c:
        c.put("counters", "before", 1)
    wait_for("replica caught up", lambda: caught_up(s.config, 0))
    # The home owner still runs: failover refuses without --force.
    out = lmshard_cli("failover", "--shard", "0", "--to", R, "-c", str(s.config_path))
    assert out.returncode == 1 and "--force" in out.stderr, out
    bad = lmshard_cli("failover", "--shard", "0", "--to", "nope", "-c", str(s.config_path))
    assert bad.returncode == 2 and "replica.names" in bad.stderr, bad
    s.kill(0, signal.SIGTERM)
    out = lmshard_cli("failover", "--shard", "0", "--to", R, "-c", str(s.config_path))
    assert out.returncode == 0, out
    assert "epoch 2" in out.stdout, out.stdout
    member = s.config.member(0, R)
    h = health(s.config, 0, R)
    assert h is not None and h.get("epoch", 2) == 2 and h.get("role", "primary") == "primary"
    ok = request(member.endpoint, put_frame(1, "after", 2))
    assert ok[1] == 0, ok
    # A client and a watch find the new primary by themselves.
    with s.client() as c, c.watch("counters", since="now") as w:
        c.put("counters", "watched", 7)
        ch = w.get(10)
        assert ch is not None and (ch.key, ch.value, ch.shard) == ("watched", 7, 0), ch
    again = lmshard_cli("failover", "--shard", "0", "--to", R, "-c", str(s.config_path))
    assert again.returncode == 1 and "is not a replica" in again.stderr, again
    # The old home owner comes back: it finds r1 primary at a higher epoch and follows it.
    s.start(0)
    wait_for("home follows r1", partial(following, s.config, 0, "home"))
    home = health(s.config, 0, "home")
    assert home is not None
    assert (home["role"], home["primary"], home["epoch"]) == ("replica", R, 2)
    refused = request(s.config.member(0).endpoint, put_frame(1, "x", 3))
    assert refused[1] == 90 and refused[2][2] == R
    ok = request(member.endpoint, put_frame(2, "later", 4))
    assert ok[1] == 0, ok
    wait_for("home caught up", lambda: caught_up(s.config, 0, "home", R))
    # And back home: r1's process stops, home takes over at epoch 3, r1 rejoins as a replica.
    reps.kill(0, signal.SIGTERM)
    out = lmshard_cli("failover", "--shard", "0", "--to", "home", "-c", str(s.config_path))
    assert out.returncode == 0 and "epoch 3" in out.stdout, out
    reps.start(0)
    wait_for("r1 follows home", partial(following, s.config, 0, R))
    back = health(s.config, 0, R)
    assert back is not None and (back["role"], back["primary"], back["epoch"]) == (
        "replica", "home", 3)
    ok = request(s.config.member(0).endpoint, put_frame(1, "home again", 5))
    assert ok[1] == 0, ok
    wait_for("r1 caught up", lambda: caught_up(s.config, 0))
    reps.stop()
    s.stop()
    assert_identical(s.config, 0, "home", R)
    t = schema.tables["counters"]
    rows = dict(copy_contents(s.config.member(0).dir)[t.db_name])
    for key in ("before", "after", "later", "home again"):
        assert t.key.encode(key) in rows


def test_a_replica_hosts_supervisord_runs_replicas_in_place_of_owners(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions

    from lmshard.config import load_config, make_config
    from lmshard.ops.supervise.conf import write_supervisord_conf

    run = Path(tempfile.mkdtemp(prefix="lms-"))
    try:
        for local, program in (("", "shard"), (R, "replica")):
            cfg = make_config(base_dir=tmp_path, shards=2, schema="tests.schemas:schema",
                              replica_names=[R], replica_local=local, readers=0,
                              run_dir=str(run))
            path = tmp_path / "lmshard.toml"
            path.write_text(cfg.to_toml())
            conf = write_supervisord_conf(load_config(path))
            (tmp_path / "var" / "log").mkdir(parents=True, exist_ok=True)
            options = ServerOptions()
            options.realize(args=["-c", str(conf)])
            group = next(g for g in options.process_group_configs if g.name == "lmshard")
            assert [p.name for p in group.process_configs] == [
                f"{program}_00", f"{program}_01", "monitor"]
            command = group.process_configs[1].command
            if local:
                assert command.endswith(f"replica --shard 1 --name {R}")
            else:
                assert command.endswith("owner --shard 1")
            argv = [*command.split(), "--help"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  env=env_for_children())
            assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.slow
def test_with_one_required_replica_an_ack_means_the_replica_has_it(tmp_path: Path) -> None:
    """durability.replicas = 1 with a real replica: acked writes are on the replica's disk
    when the owner dies; a replica paused (SIGSTOP) past replica_timeout makes writes fail
    with ReplicaTimeout, committed on the owner only; resent after it resumes, the same batch
    is acked and applied once."""
    s = Cluster(tmp_path, shards=1, replica_names=[R], replica_data_dir=str(tmp_path / "rep"),
                replicas_required=1, replica_timeout=1.0)
    s.start()
    reps = Replicas(s)
    try:
        reps.start()
        wait_for("replica following", partial(following, s.config, 0))
        with s.client(timeout_ms=4000, retries=0) as c:
            for _ in range(200):
                c.incr("counters", "acked")
            reps.procs[0].send_signal(signal.SIGSTOP)
            t = schema.tables["counters"]
            frame = protocol.WRITE.frame(uuid.uuid4().bytes, 1, [protocol.op(
                protocol.OP_INCR, t.table_id.bytes, t.key.encode("paused"), 1)])
            refused = request(s.config.endpoint(0), frame, 10.0)
            assert refused[1] == ReplicaTimeout.code, refused
            assert "1 replica" in refused[2][0] or "replicas" in refused[2][0], refused
            # Committed on the owner all the same: its reply is kept for a resend.
            assert c.get("counters", "paused") == 1
            reps.procs[0].send_signal(signal.SIGCONT)
            # The same batch again (same client id and sequence number): answered once the
            # replica has it, not applied a second time.
            reply = request(s.config.endpoint(0), frame, 10.0)
            assert reply[1] == 0, reply
            assert c.get("counters", "paused") == 1
            assert c.get("counters", "acked") == 200
        s.kill(0)  # the owner dies: every acked write must be on the replica's disk
        reps.stop()
        with Store(s.config.member(0, R).dir, schema, readonly=True) as st, st.read() as r:
            assert r.get("counters", "acked") == 200
            assert r.get("counters", "paused") == 1
    finally:
        if reps.procs:
            reps.procs[0].send_signal(signal.SIGCONT)
        reps.stop()
        s.stop()


def test_a_write_no_replica_confirms_fails_with_replica_timeout_not_a_silent_owner(
        tmp_path: Path) -> None:
    """Acks that wait for a replica take up to replica_timeout, longer than the client's
    timeout here: the client waits for the owner's answer (ReplicaTimeout) instead of giving
    the owner up as silent, and the write is committed on the owner."""
    s = Cluster(tmp_path, shards=1, replica_names=[R], replica_data_dir=str(tmp_path / "rep"),
                replicas_required=1, replica_timeout=1.0)
    s.start()
    try:
        with s.client(timeout_ms=300, retries=1) as c:
            with pytest.raises(ReplicaTimeout):
                c.put("counters", "lonely", 1)
            with pytest.raises(ReplicaTimeout):
                with c.batch() as b:
                    b.put("counters", "lonelier", 2)
                    b.put("blobs", 1, b"x")
        with s.client(local_reads=False) as c:
            assert c.get("counters", "lonely") == 1
    finally:
        s.stop()
