"""Backups against real shard owners: the consistent cut, bounded memory, verify, restore."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

import lmshard
from lmshard import backup_wire, protocol, wire
from lmshard.backup_wire import (
    CANCEL,
    CHUNK,
    CREDIT,
    ERROR,
    PAUSE,
    PAUSED,
    READY,
    RESUME,
    RESUMED,
    SNAPSHOT,
    decode,
    pack,
)
from lmshard.errors import ProtocolError, ShardUnavailable
from lmshard.ops import backup
from lmshard.ops.cli import main as lmshard_main
from lmshard.testing import LocalService
from tests.cluster import Cluster, restore_into, wait_for
from tests.faults.backup_check import RestoredCut, backup_restore_rows
from tests.workers import BATCH, series_on_shard

pytestmark = pytest.mark.slow

BLOB = 64 * 2**10
"""Bytes per blob in the large store."""
BLOBS = 1024
"""Blobs in the large store: 64 MiB, far more than an owner's stream buffer (a few MiB)."""


# --------------------------------------------------------------------------------------------
# Workers (module level, so the spawn start method can import them)
# --------------------------------------------------------------------------------------------


def shard_writer(config_path: str, shard: int, name: str, out: str, started: str,
                 stop: str) -> None:
    """Batches of 10 events + 1 counter increment on one shard until ``stop`` exists; logs
    every acked batch with the txn id it landed in. ``name`` is unique per test."""
    acked: list[list[int]] = []
    try:
        with lmshard.connect(config_path, timeout_ms=1000, retries=20) as c:
            series = series_on_shard(c, shard, name)
            n = 0
            while not os.path.exists(stop):
                with c.batch() as b:
                    for i in range(BATCH):
                        b.put("events", (series, n * BATCH + i), {"batch": n, "i": i})
                    b.incr("counters", series, 1)
                acked.append([n, b.txn_ids[shard]])
                if n == 0:
                    Path(started).touch()
                n += 1
        result = {"series": series, "shard": shard, "acked": acked, "error": None}
    except BaseException:
        result = {"series": None, "acked": acked, "error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


def chain_writer(config_path: str, name: str, out: str, started: str, stop: str) -> None:
    """Step i goes to shard i % shards and is sent only after step i-1 was acked, so a cut that
    is one point in time holds a prefix of the steps and never a step without its predecessor."""
    steps: list[list[int]] = []
    try:
        with lmshard.connect(config_path, timeout_ms=1000, retries=20) as c:
            shards = c.config.shards
            series = [series_on_shard(c, s, f"{name}{s}") for s in range(shards)]
            i = 0
            while not os.path.exists(stop):
                s = i % shards
                with c.batch() as b:
                    b.put("events", (series[s], i), {"step": i})
                steps.append([i, s, b.txn_ids[s]])
                if i == shards:
                    Path(started).touch()
                i += 1
        result = {"series": series, "steps": steps, "error": None}
    except BaseException:
        result = {"series": None, "steps": steps, "error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four owners shared by the tests of this module that do not kill one."""
    c = Cluster(tmp_path_factory.mktemp("cluster4"))
    c.start()
    try:
        with c.client() as client:
            with client.batch() as b:
                for i in range(200):
                    b.put("users", uuid.UUID(int=i + 1), {"email": f"u{i}@x.org"})
                    b.put("items", i, {"group": i % 5, "i": i})
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def big_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One owner holding BLOBS * BLOB bytes of random blobs."""
    c = Cluster(tmp_path_factory.mktemp("big"), shards=1, map_size="256MiB", sync=False)
    c.start()
    try:
        with c.client() as client:
            for start in range(0, BLOBS, 16):
                with client.batch() as b:
                    for k in range(start, start + 16):
                        b.put("blobs", k, os.urandom(BLOB))
        yield c
    finally:
        c.stop()


def _status(pid: int) -> dict[str, int]:
    """Memory figures of a process in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _dealer(cluster: Cluster, shard: int) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(cluster.config.backup_endpoint(shard))
    return sock


def _answer(sock: zmq.Socket[bytes]) -> tuple[wire.Message, list[Any]]:
    got = decode(sock.recv_multipart(), "owner")
    return got.message, got.values


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = lmshard_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _config_file(service: LocalService) -> str:
    """The config file of a service that is never started (its run dir is removed at once)."""
    service.stop()
    return str(service.config_path)


def _events_by_batch(c: lmshard.Client, series: str) -> dict[int, int]:
    by_batch: dict[int, int] = {}
    for _key, v in c.scan("events", prefix=(series,)):
        by_batch[v["batch"]] = by_batch.get(v["batch"], 0) + 1
    return by_batch


@contextlib.contextmanager
def _writing_hard(cluster: Cluster, tmp_path: Path, name: str) -> Iterator[dict[str, Any]]:
    """A writer per shard and a chain writer across shards (series named after ``name``),
    started and writing; after the block they stop, and the dict yielded gets their logs:
    ``writers`` (one per shard) and ``chain``."""
    ctx = mp.get_context("spawn")
    cfg = str(cluster.config_path)
    stop = tmp_path / "stop"
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (shard_writer, (cfg, s, f"{name}-w{s}-", str(tmp_path / f"w{s}.json"),
                        str(tmp_path / f"s{s}"), str(stop))) for s in range(4)]
    jobs.append((chain_writer, (cfg, f"{name}-chain", str(tmp_path / "chain.json"),
                                str(tmp_path / "schain"), str(stop))))
    procs = [ctx.Process(target=t, args=a) for t, a in jobs]
    for p in procs:
        p.start()
    logs: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / n).exists() for n in ("s0", "s1", "s2", "s3", "schain")):
            assert time.monotonic() < deadline, "the writers did not start"
            assert all(p.exitcode is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.3)
        yield logs
        time.sleep(0.3)  # writes go on after the cut
    finally:
        stop.touch()
        for p in procs:
            p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    logs["writers"] = [json.loads((tmp_path / f"w{s}.json").read_text()) for s in range(4)]
    logs["chain"] = json.loads((tmp_path / "chain.json").read_text())
    assert [w["error"] for w in logs["writers"]] == [None] * 4 and logs["chain"]["error"] is None


def _steps_at_the_cut(chain: dict[str, Any], cut: dict[int, int]) -> set[int]:
    """The chain writer's steps a backup with ``cut`` must hold: a prefix of the steps, and
    not all of them (the cut fell inside the run)."""
    expected = {i for i, s, t in chain["steps"] if t <= cut[s]}
    assert expected == set(range(len(expected))) and len(expected) < len(chain["steps"])
    return expected


# --------------------------------------------------------------------------------------------
# The consistent cut
# --------------------------------------------------------------------------------------------


def test_consistent_backup_under_load_restores_exactly_the_cut(
    cluster4: Cluster, tmp_path: Path
) -> None:
    with _writing_hard(cluster4, tmp_path, "load") as logs:
        result = backup.take_backup(cluster4.config, tmp_path / "bk")
    writers, chain = logs["writers"], logs["chain"]
    m = result.manifest
    cut = {sf.shard: sf.txn_id for sf in m.shards}
    assert m.consistent and m.shard_ids == [0, 1, 2, 3]
    assert m.pause_ms is not None and m.pause_ms < backup.PAUSE_TIMEOUT * 1000
    print(f"\ncut {cut}; writes paused at most {m.pause_ms:.2f} ms per shard "
          f"{[sf.paused_ms for sf in m.shards]}, barrier {m.barrier_ms:.2f} ms")

    restored = Cluster(tmp_path / "restored")
    restore_into(result.path, restored)
    restored.start()
    try:
        with restored.client() as c:
            for w in writers:
                before = {n for n, t in w["acked"] if t <= cut[w["shard"]]}
                after = {n for n, t in w["acked"] if t > cut[w["shard"]]}
                assert before and after  # the cut fell inside the run
                by_batch = _events_by_batch(c, w["series"])
                assert set(by_batch) == before  # exactly the batches committed up to the cut
                assert all(n == BATCH for n in by_batch.values())
                assert c.get("counters", w["series"]) == len(before)
            present: set[int] = set()
            for s, series in enumerate(chain["series"]):
                steps = {v["step"] for _k, v in c.scan("events", prefix=(series,))}
                assert all(i % 4 == s for i in steps)
                present |= steps
            assert present == _steps_at_the_cut(chain, cut)  # a prefix: one point in time
            assert c.count("users") == 200 and len(c.lookup("items", "by_group", 3)) == 40
    finally:
        restored.stop()


def test_an_owner_stopped_during_the_cut_gets_a_new_attempt(cluster4: Cluster, tmp_path: Path
                                                            ) -> None:
    """Issue 18's failure: under load, one owner SIGSTOPped past the barrier's timeout during
    the cut. The first attempt gives up on it and resumes the others; the owner's late PAUSED
    is recognised as the old attempt's; the second attempt cuts every shard at one point in
    time, and the restored copy (read back by the fault campaign's check) holds exactly it."""
    notes = io.StringIO()
    pid = cluster4.pid(1)
    with _writing_hard(cluster4, tmp_path, "stopped") as logs:
        os.kill(pid, signal.SIGSTOP)
        wake = threading.Timer(2.0, os.kill, (pid, signal.SIGCONT))
        wake.start()
        try:
            got = backup_restore_rows(cluster4.config_path, tmp_path / "check",
                                      progress=backup.Progress("backup", notes))
        finally:
            wake.cancel()
            os.kill(pid, signal.SIGCONT)
    text = notes.getvalue()
    print(f"\n{text}")
    assert re.search(r"backup: retrying the cut \(attempt 2 of 3\): shards? (\d, )*1(, \d)* "
                     r"did not answer PAUSED within 1\.5 s\n", text), text
    assert got.attempts >= 2 and f"(attempt {got.attempts} of 3)" in text
    _assert_rows_of_the_cut(got, logs)
    with cluster4.client(timeout_ms=500, retries=0) as c:  # no owner was left paused
        for shard in range(4):
            assert c.ping(shard)["shard"] == shard
    wait_for("every snapshot released",
             lambda: not any(_snapshot_txns(cluster4, s) for s in range(4)))


def _assert_rows_of_the_cut(got: RestoredCut, logs: dict[str, Any]) -> None:
    """``got`` holds every batch the writers had acked by the cut and none after."""
    events: dict[str, list[dict[str, Any]]] = {}
    for (table, key), value in got.rows.items():
        if table == "events":
            events.setdefault(key[0], []).append(value)
    for w in logs["writers"]:
        before = {n for n, t in w["acked"] if t <= got.cut[w["shard"]]}
        assert before and len(before) < len(w["acked"])  # the cut fell inside the run
        batches = [v["batch"] for v in events[w["series"]]]
        assert sorted(batches) == sorted(n for n in before for _ in range(BATCH))
        assert got.rows["counters", w["series"]] == len(before)
    chain = logs["chain"]
    steps = {v["step"] for series in chain["series"] for v in events.get(series, [])}
    assert steps == _steps_at_the_cut(chain, got.cut)
    assert sum(table == "users" for table, _ in got.rows) == 200


def test_backup_check_reads_back_every_row_the_service_holds(cluster4: Cluster, tmp_path: Path
                                                             ) -> None:
    got = backup_restore_rows(cluster4.config_path, tmp_path / "check")
    schema = cluster4.config.load_schema()
    with cluster4.client() as c:
        held = {(t, tuple(k) if isinstance(k, list) else k): v
                for t in schema.tables for k, v in c.scan(t)}
        last = {s: c.ping(s)["txn_id"] for s in range(4)}
    assert got.rows == held and len(held) >= 400
    assert got.cut == last and got.attempts == 1
    assert got.backup.parent == tmp_path / "check" / "backups"
    assert sorted(p.name for p in got.data_dir.iterdir()) == [f"shard-{n:02d}" for n in range(4)]


def _ask(sock: zmq.Socket[bytes], session: bytes, m: wire.Message, attempt: int,
         *values: Any) -> tuple[wire.Message, int, list[Any]]:
    sock.send(pack(m, session, attempt, *values))
    got = decode(sock.recv_multipart(), "owner")
    assert got.session == session
    return got.message, got.attempt, got.values


def test_the_owner_keys_its_pause_by_attempt(cluster4: Cluster) -> None:
    s, sock = os.urandom(16), _dealer(cluster4, 2)
    assert _ask(sock, s, PAUSE, 1, 2000)[:2] == (PAUSED, 1)
    assert _ask(sock, s, PAUSE, 2, 2000)[:2] == (PAUSED, 2)  # a later attempt takes it over
    m, attempt, values = _ask(sock, s, PAUSE, 1, 2000)
    assert (m, attempt) == (ERROR, 1) and "came after attempt 2" in values[1]
    m, attempt, values = _ask(sock, s, SNAPSHOT, 1, True, backup.CHUNK_SIZE)
    assert (m, attempt) == (ERROR, 1) and "no pause on the shard for this attempt" in values[1]
    assert _ask(sock, s, RESUME, 1)[:2] == (RESUMED, 1)
    with cluster4.client(timeout_ms=300, retries=0) as c, pytest.raises(ShardUnavailable):
        c.ping(2)  # an earlier attempt's RESUME leaves attempt 2's pause on
    assert _ask(sock, s, RESUME, 2)[:2] == (RESUMED, 2)
    with cluster4.client(timeout_ms=1000, retries=0) as c:
        assert c.ping(2)["shard"] == 2
    sock.close()


def test_a_snapshot_of_an_abandoned_attempt_is_released(cluster4: Cluster) -> None:
    """An owner stopped through a whole abandoned attempt reads it all at once when it wakes:
    the snapshot that attempt asked for is released, not left to stream, and the next attempt
    cuts."""
    s, sock, pid = os.urandom(16), _dealer(cluster4, 2), cluster4.pid(2)
    requests: list[tuple[Any, ...]] = [
        (PAUSE, 1, 2000), (SNAPSHOT, 1, True, backup.CHUNK_SIZE), (CANCEL, 1), (RESUME, 1),
        (PAUSE, 2, 2000), (SNAPSHOT, 2, True, backup.CHUNK_SIZE)]
    os.kill(pid, signal.SIGSTOP)
    try:
        for m, attempt, *values in requests:
            sock.send(pack(m, s, attempt, *values))
        time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    answers: list[tuple[wire.Message, int]] = []
    while (READY, 2) not in answers:
        got = decode(sock.recv_multipart(), "owner")
        answers.append((got.message, got.attempt))
    # READY of attempt 1 comes only if CANCEL reached the owner after the snapshot was open.
    assert [a for a in answers if a != (READY, 1)] == [(PAUSED, 1), (RESUMED, 1), (PAUSED, 2),
                                                       (READY, 2)]
    assert len(_snapshot_txns(cluster4, 2)) == 1  # attempt 2's
    sock.send(pack(CANCEL, s, 2))
    wait_for("attempt 2's snapshot released", lambda: not _snapshot_txns(cluster4, 2))
    sock.close()


def test_no_consistent_backup_and_keep_retention(
    cluster4: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "nightly"
    cfg = str(cluster4.config_path)
    made = []
    for _ in range(3):
        code, out, err = _cli(capsys, "backup", str(dest), "--no-consistent", "--keep", "2",
                              "-c", cfg)
        assert code == 0, err
        made.append(Path(out.split()[1].rstrip(":")))
        assert "backup shard 00" in err and "done" in err  # progress lines on stderr
    assert backup.list_backups(dest) == made[1:]
    assert "removed old backup" in out
    m = backup.Manifest.load(made[-1] / backup.MANIFEST_NAME)
    assert not m.consistent and m.pause_ms is None
    assert all(sf.paused_ms is None for sf in m.shards)
    code, out, _ = _cli(capsys, "verify", str(dest), "-q")  # DEST means its newest backup
    assert code == 0 and str(made[-1]) in out


# --------------------------------------------------------------------------------------------
# The barrier's safety
# --------------------------------------------------------------------------------------------


def test_pause_is_lifted_when_the_coordinator_vanishes(cluster4: Cluster) -> None:
    a, b = os.urandom(16), os.urandom(16)
    sock = _dealer(cluster4, 0)
    sock.send(pack(PAUSE, a, 1, 300))
    m, values = _answer(sock)
    assert m is PAUSED and values[0] > 0
    other = _dealer(cluster4, 0)
    other.send(pack(PAUSE, b, 1, 300))
    m, values = _answer(other)
    assert m is ERROR and "another backup" in values[1]
    sock.close()  # the coordinator is gone without lifting its pause
    with cluster4.client(timeout_ms=3000, retries=0) as c:
        assert c.ping(0)["shard"] == 0  # held while paused, answered once the pause expired
    again = _dealer(cluster4, 0)
    again.send(pack(SNAPSHOT, a, 1, True, backup.CHUNK_SIZE))
    m, values = _answer(again)
    assert m is ERROR and "holds no pause" in values[1]
    other.send(pack(PAUSE, b, 1, 1000))  # the barrier is free again
    assert _answer(other)[0] is PAUSED
    other.send(pack(RESUME, b, 1))
    assert _answer(other)[0] is RESUMED
    for s in (other, again):
        s.close()


def test_a_shard_missing_at_the_barrier_fails_the_backup_and_resumes_the_others(
    cluster4: Cluster, tmp_path: Path
) -> None:
    cluster4.kill(3, signal.SIGTERM)
    try:
        with pytest.raises(backup.BackupError, match=r"no consistent cut in 2 attempts; the "
                           r"last: shard 3 did not answer PAUSED within 0.5 s"):
            backup.take_backup(cluster4.config, tmp_path / "bk", barrier_timeout=0.5,
                               cut_attempts=2)
        assert list((tmp_path / "bk").iterdir()) == []
        # RESUME lifted the others' pause at once: far sooner than their own 2 s timeout.
        with cluster4.client(timeout_ms=500, retries=0) as c:
            for shard in range(3):
                assert c.ping(shard)["shard"] == shard
    finally:
        cluster4.start(3)


def test_hostile_frames_on_the_backup_socket_get_errors(cluster4: Cluster, tmp_path: Path
                                                        ) -> None:
    sock = _dealer(cluster4, 1)
    session = os.urandom(16)
    bad = [
        [b""],
        [b"\x01\xc1"],
        [b"\x07" + pack(PAUSE, session, 1, 100)[1:]],  # wrong protocol version
        # version 1's PAUSE, without the attempt id
        [protocol.VERSION_BYTE + b"\x93\x01\xc4\x10" + session + b"\x64"],
        [bytes([backup_wire.BACKUP_VERSION]) + b"\x94\x63\xc4\x10" + session
         + b"\x01\x01"],  # unknown code 99
        [pack(PAUSE, session, -1, 100)],  # bad attempt
        [pack(PAUSE, session, "1", 100)],  # type: ignore[arg-type]  # on purpose
        [pack(PAUSE, session, 1, 10**9)],  # pause longer than allowed
        [pack(PAUSE, b"short", 1, 100)],
        [pack(SNAPSHOT, session, 1, True, 10)],  # chunk too small
        [pack(CREDIT, session, 1, 5)],  # no stream
        [pack(PAUSE, session, 1, 100), b"extra", b"frames"],
        [pack(READY, session, 1, 1, 1, 1)],  # an owner's message
    ]
    for frames in bad:
        sock.send_multipart(frames)
        m, values = _answer(sock)
        assert m is ERROR and values[0] == ProtocolError.code, (frames, values)
    sock.close()
    result = backup.take_backup(cluster4.config, tmp_path / "bk")
    assert backup.verify_backup(result.path).ok


# --------------------------------------------------------------------------------------------
# Bounded memory, and a shard dying mid-stream
# --------------------------------------------------------------------------------------------


def test_backup_of_a_large_store_keeps_owner_memory_bounded(
    big_cluster: Cluster, tmp_path: Path
) -> None:
    pid = big_cluster.pid(0)
    # The first backup maps every page of the store into the owner (file-backed RSS, shared
    # with the page cache); the second shows what a backup itself costs.
    cold = _status(pid)
    first = backup.take_backup(big_cluster.config, tmp_path / "bk")
    store_size = first.manifest.size
    assert store_size >= BLOBS * BLOB
    before = _status(pid)
    peak = dict(before)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status(pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        second = backup.take_backup(big_cluster.config, tmp_path / "bk")
    finally:
        done.set()
        sampler.join()
    after = _status(pid)
    assert second.manifest.shards[0].sha256 == first.manifest.shards[0].sha256  # no writes
    anon_growth = peak["RssAnon"] - before["RssAnon"]
    hwm_growth = after["VmHWM"] - before["VmRSS"]
    mib = 2**20
    print(f"\nbefore the first backup: VmRSS {cold['VmRSS'] / mib:.1f} MiB (anon "
          f"{cold['RssAnon'] / mib:.1f}, file {cold['RssFile'] / mib:.1f}), VmHWM "
          f"{cold['VmHWM'] / mib:.1f}")
    print(f"store {store_size / mib:.1f} MiB; owner before: VmRSS {before['VmRSS'] / mib:.1f} "
          f"MiB (anon {before['RssAnon'] / mib:.1f}, file {before['RssFile'] / mib:.1f}), "
          f"VmHWM {before['VmHWM'] / mib:.1f}; during the backup: peak RssAnon +"
          f"{anon_growth / mib:.1f} MiB, peak VmRSS +{(peak['VmRSS'] - before['VmRSS']) / mib:.1f}"
          f" MiB; after: VmRSS {after['VmRSS'] / mib:.1f}, VmHWM {after['VmHWM'] / mib:.1f} MiB")
    assert before["RssAnon"] - cold["RssAnon"] < store_size / 8  # the first one's leftovers
    assert anon_growth < store_size / 8
    assert hwm_growth < store_size / 4


def _snapshot_txns(cluster: Cluster, shard: int) -> list[str]:
    """Txn ids of the read transactions the owner of ``shard`` holds (LMDB's reader table)."""
    env = lmdb.open(str(cluster.config.shard_dir(shard)), readonly=True, max_dbs=256)
    try:
        rows = [line.split() for line in env.readers().splitlines()[1:]]
    finally:
        env.close()
    return [r[2] for r in rows if int(r[0]) == cluster.pid(shard) and r[2] != "-"]


def _open_stream(cluster: Cluster, credit: int) -> tuple[zmq.Socket[bytes], bytes]:
    sock, session = _dealer(cluster, 0), os.urandom(16)
    sock.send(pack(SNAPSHOT, session, 1, False, backup.CHUNK_SIZE))
    assert _answer(sock)[0] is READY
    sock.send(pack(CREDIT, session, 1, credit))
    for _ in range(credit):
        assert _answer(sock)[0] is CHUNK
    assert not sock.poll(200)  # no credit left: the owner sends nothing more
    return sock, session


def test_cancelled_stream_releases_its_snapshot_and_sigterm_stops_a_streaming_owner(
    big_cluster: Cluster,
) -> None:
    sock, session = _open_stream(big_cluster, 2)
    assert len(_snapshot_txns(big_cluster, 0)) == 1  # the copier holds the snapshot
    sock.send(pack(CANCEL, session, 1))
    deadline = time.monotonic() + 10
    while _snapshot_txns(big_cluster, 0):
        assert time.monotonic() < deadline, "the cancelled stream kept its read transaction"
        time.sleep(0.05)
    sock.close()

    sock, _ = _open_stream(big_cluster, 1)  # its copier is blocked on a full pipe
    big_cluster.kill(0, signal.SIGTERM)
    assert big_cluster.procs[0].returncode == 0
    sock.close()
    big_cluster.start(0)


class _KillOnFirstChunk(backup.Progress):
    def __init__(self, pid: int) -> None:
        super().__init__("backup", quiet=True)
        self.pid = pid
        self.failures: list[str] = []

    def advance(self, shard: int, nbytes: int) -> None:
        super().advance(shard, nbytes)
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            self.pid = 0

    def failed(self, shard: int, why: str) -> None:
        self.failures.append(why)


def test_owner_dying_mid_stream_fails_clearly_and_leaves_no_partial_file(
    big_cluster: Cluster, tmp_path: Path
) -> None:
    dest = tmp_path / "bk"
    progress = _KillOnFirstChunk(big_cluster.pid(0))
    with pytest.raises(backup.BackupError, match=r"shard 0's owner went away after .* of "
                       r"~\d+\.\d MiB.*removed the partial backup"):
        backup.take_backup(big_cluster.config, dest, progress=progress, stall_timeout=10)
    assert progress.failures
    assert list(dest.iterdir()) == []
    big_cluster.procs[0].wait(10)


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def test_verify_catches_a_flipped_byte_a_missing_file_and_a_broken_index(
    cluster4: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = backup.take_backup(cluster4.config, tmp_path / "bk").path
    code, out, err = _cli(capsys, "verify", str(good))
    assert code == 0 and "is intact" in out and "verify shard 03" in err

    flipped = shutil.copytree(good, tmp_path / "flipped")
    f = flipped / "shard-01.mdb"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    missing = shutil.copytree(good, tmp_path / "missing")
    (missing / "shard-02.mdb").unlink()
    code, out, _ = _cli(capsys, "verify", str(flipped), "-q")
    assert code == 1 and "shard 1: shard-01.mdb is damaged" in out
    code, out, _ = _cli(capsys, "verify", str(missing), "-q")
    assert code == 1 and "shard 2: shard-02.mdb is missing" in out

    # Checksums alone trust whatever was copied: an index entry lost at the source (here
    # removed from the copy, with the manifest updated to match) is found by the walk.
    broken = shutil.copytree(good, tmp_path / "broken")
    with cluster4.client() as c:
        shard = c.table("users").route.pinned
    assert shard is not None
    path = broken / backup.shard_file_name(shard)
    env = lmdb.open(str(path), subdir=False, lock=False, max_dbs=256)
    schema = cluster4.config.load_schema()
    with env.begin(write=True) as txn:
        db = env.open_db(schema.tables["users"].indexes["by_email"].db_name, txn=txn)
        assert txn.delete(backup_index_key("u7@x.org"), db=db)
    env.close()
    m = backup.Manifest.load(broken / backup.MANIFEST_NAME)
    sf = m.shards[shard]
    sf.size, sf.sha256 = backup.hash_file(path)
    (broken / backup.MANIFEST_NAME).write_text(m.to_json())
    report = backup.verify_backup(broken)
    assert not report.ok
    assert any("users.by_email" in p and "missing from the index" in p for p in report.problems)


def backup_index_key(email: str) -> bytes:
    from lmshard.keys import encode_index_value

    return encode_index_value(email)


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------


def test_restore_refuses_mismatched_slot_map_schema_and_existing_data(
    cluster4: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = backup.take_backup(cluster4.config, tmp_path / "bk").path

    other_map = _config_file(Cluster(tmp_path / "map", slot_map=[
        [0, 100, 0], [100, 512, 1], [512, 768, 2], [768, 1024, 3]]))
    target = tmp_path / "restore-here"
    code, _, err = _cli(capsys, "restore", str(src), "--to", str(target), "-c", other_map)
    assert code == 1
    assert "slot map" in err and "wrong shards" in err and "migration" in err
    assert not target.exists()

    two_shards = _config_file(Cluster(tmp_path / "two", shards=2))
    code, _, err = _cli(capsys, "restore", str(src), "--to", str(target), "-c", two_shards)
    assert code == 1 and "4 shards" in err and "2 shards" in err

    other_schema = _config_file(LocalService(tmp_path / "schema", "lmshard.demo:schema",
                                             shards=4))
    code, _, err = _cli(capsys, "restore", str(src), "--to", str(target), "-c", other_schema)
    assert code == 1 and "schema 'fleet'" in err

    same = _config_file(Cluster(tmp_path / "same"))
    code, out, err = _cli(capsys, "restore", str(src), "--to", str(target), "-c", same)
    assert code == 0 and "restored" in out and "restore shard 02" in err
    assert sorted(p.name for p in target.iterdir()) == [f"shard-{n:02d}" for n in range(4)]
    assert all((target / f"shard-{n:02d}" / "data.mdb").is_file() for n in range(4))
    code, _, err = _cli(capsys, "restore", str(src), "--to", str(target), "-c", same)
    assert code == 1 and "already holds shard data" in err and "--force" in err
    code, out, _ = _cli(capsys, "restore", str(src), "--to", str(target), "-c", same,
                        "--force", "-q")
    assert code == 0 and "replaced" in out

    code, _, err = _cli(capsys, "restore", str(src), "--to", str(cluster4.config.data_dir),
                        "-c", str(cluster4.config_path), "--force")
    assert code == 1 and "the service is running" in err


def test_docs_show_the_message_table_of_the_registry() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "backup.md").read_text()
    assert backup_wire.message_table() in docs
    assert wire.CHANNELS["backup"] is backup_wire.CHANNEL


def test_frame_bytes() -> None:
    """The byte format itself: version byte 2, then msgpack ``[code, session, attempt,
    fields...]``."""
    session = bytes(range(16))
    assert pack(PAUSE, session, 2, 300) == (b"\x02\x94\x01\xc4\x10" + session
                                            + b"\x02\xcd\x01\x2c")
    assert pack(RESUME, session, 1) == b"\x02\x93\x04\xc4\x10" + session + b"\x01"
    assert pack(ERROR, b"", 0, 60, "bad", None) == (b"\x02\x96\xcc\xc7\xc4\x00\x00\x3c"
                                                    b"\xa3bad\xc0")
    got = decode([pack(CHUNK, session, 3, 7), b"bytes"], "owner")
    assert tuple(got) == (CHUNK, session, 3, [7], b"bytes")
    with pytest.raises(TypeError):
        pack(PAUSE, session, 1)
