"""The floors: what lmshard's design cannot go below, measured in each round beside the workloads.

    python -m bench.suite --only floors                      # the floors alone
    python -m bench.suite --only put1,put1_sec,remote_get,floors

An acked single put is at least a round trip from the client to its shard owner and one
commit of the row and the client's sequence record; a remote get through the reader pool is
at least a round trip to a reader. So each round measures, in fresh worker processes as the
workloads (bench.procs), on the same machine and filesystem, seconds apart from them:

- ``rtt_put`` / ``rtt_get``: a bare pyzmq DEALER/ROUTER round trip over ipc of a put-sized
  and of a get-sized frame, one client process and one echo server process, no lmshard;
- ``rtt_unix_put``: the same put-sized exchange over a plain unix stream socket, each frame
  behind its 4-byte length (``lmshard.unix_wire``), the way a same-host client's single put
  reaches its owner (``shard.unix_socket``);
- ``commit_sync`` / ``commit_nosync``: an in-process raw py-lmdb write transaction putting one
  row (CBOR, encoded before the clock as the client sends it encoded) and a client record
  (msgpack, packed inside the clock as the owner packs it) into two named databases, with
  ``sync=True`` (an fsync per commit) and with ``sync=False`` (the flush-each-second mode's
  floor: no flush at all); the environment holds one shard's share of the records first;
- ``commit_log_sync`` / ``commit_log_nosync``: the same with a change-log record beside them
  (msgpack of the row's effect under an 8-byte big-endian counter in a third database), as an
  owner's commit writes one with ``[changes] enabled`` (the default): LMDB writes and flushes
  every page a commit dirtied, so each database a commit touches costs pages in its flush.

- ``served_sync`` / ``served_nosync``: the unix round trip again, to a server that makes the
  ``commit_log`` commit before each answer: the smallest owner, with no lmshard code. Its rate
  is the single put's floor (``served_nosync`` the flush-each-second put's): a round trip plus a
  commit as they happen one after the other, with the wake-ups an fsync's wait costs the
  client and the server, which neither part measured alone has.

- ``served_chunk_sync``: the same for a time series append: a frame of a 1,000-point chunk
  (16 KB) to a server that commits the chunk, the series' head row, the client record and a
  change-log record of both, with fsync, before it answers; its rate is in points/s. (The raw
  py-lmdb append of the suite writes the chunk alone, in-process.)

- ``served8_sync`` / ``served8_nosync``: the acked puts of 8 clients: 8 client processes,
  each sending its puts to four such servers in turn (as its keys spread over four shards),
  each server committing every request waiting on its connections in one transaction (a group
  commit) before it answers them. The floor of the 8-client puts, with and without fsync.

The single put's parts' sum, ``1 / (rtt_unix_put + commit_log_sync)`` from their p50s, is
kept beside it (``derived``). The remote get's floor is the ``rtt_get`` rate itself (the reader
pool speaks ZeroMQ). The in-process workloads (inserts, lookups, get_many, time series appends,
the mixed fleet) have raw py-lmdb as their floor, which the suite measures anyway.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import timing
from bench.procs import Run, Sample, context, run_workers
from bench.schema import record

PUT_REQUEST = 150
"""Bytes of a single put's request frame (table id, key, ~115 B of CBOR, client id, seq)."""
PUT_REPLY = 20
"""Bytes of its ack (seq, status, txn id, epoch)."""
GET_REQUEST = 41
"""Bytes of a reader pool get request (as bench/remote_reads.py's floor)."""
GET_REPLY = 91
"""Bytes of a get's reply for a record of about 90 bytes."""
CHUNK_POINTS = 1000
"""Points of a time series append (the suite's ``TS_APPEND``)."""
CHUNK_BYTES = CHUNK_POINTS * 16
"""Bytes of its chunk: an int64 timestamp and a float64 value a point."""
GROUP_CLIENTS = 8
"""Clients of the group-committing floor: as many as the 8-client acked puts have."""
SHARDS = 4
"""The suite's lmshard service has this many shards; a commit floor's environment holds one
shard's share of the records, as an owner's does."""
WARM = 64
"""Untimed round trips or commits before the clock starts."""
ANSWER_MS = 10_000
"""How long a round trip client waits for the echo server's first answer."""


@dataclass(frozen=True)
class Part:
    key: str
    label: str


PARTS: tuple[Part, ...] = (
    Part("rtt_put", f"bare pyzmq DEALER/ROUTER round trip, ipc, {PUT_REQUEST} B -> {PUT_REPLY} B"),
    Part("rtt_get", f"bare pyzmq DEALER/ROUTER round trip, ipc, {GET_REQUEST} B -> {GET_REPLY} B"),
    Part("rtt_unix_put", f"plain unix stream socket round trip, {PUT_REQUEST} B -> {PUT_REPLY} B"),
    Part("commit_sync", "raw py-lmdb commit of a row + client record, sync=True"),
    Part("commit_nosync", "raw py-lmdb commit of a row + client record, sync=False"),
    Part("commit_log_sync", "the same + a change-log record, sync=True"),
    Part("commit_log_nosync", "the same + a change-log record, sync=False"),
    Part("served_sync", "unix round trip to a server committing row + client record + "
         "change-log record before each answer, sync=True"),
    Part("served_nosync", "unix round trip to a server committing row + client record + "
         "change-log record before each answer, sync=False"),
    Part("served8_sync", f"{GROUP_CLIENTS} clients' unix round trips, spread over {SHARDS} "
         "such servers that each commit every request waiting in one transaction, sync=True"),
    Part("served8_nosync", f"{GROUP_CLIENTS} clients' unix round trips, spread over {SHARDS} "
         "such servers that each commit every request waiting in one transaction, sync=False"),
    Part("served_chunk_sync", f"unix round trip of a {CHUNK_POINTS:,}-point time series "
         f"append ({CHUNK_BYTES:,} B) to a server committing the chunk, the series head, a "
         "client record and a change-log record of both before each answer, sync=True "
         "(rate in points/s)"),
)
BY_KEY = {p.key: p for p in PARTS}

DERIVED: dict[str, tuple[str, str, str]] = {
    "put1": ("rtt_unix_put", "commit_log_sync", "unix round trip + commit with log, fsync"),
    "put1_sec": ("rtt_unix_put", "commit_log_nosync",
                 "unix round trip + commit with log, no fsync"),
}
"""Workload: (round trip part, commit part, what its floor is), a floor rate from their p50s."""


# -- the workers -------------------------------------------------------------------------------


def echo(endpoint: str, reply_size: int) -> None:
    """The round trip's server: a ROUTER answering every request with ``reply_size`` bytes,
    as an owner answers on its ROUTER; runs until terminated."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    recv, send, reply = sock.recv_multipart, sock.send_multipart, b"\x00" * reply_size
    while True:
        ident, _ = recv()
        send([ident, reply])


def round_trip(spec: dict[str, Any]) -> Run:
    """The round trip's client: a DEALER sending one frame of ``request`` bytes and waiting
    (blocking) for the answer, ``count`` times, each timed."""
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(spec["endpoint"])
    send, recv, frame = sock.send, sock.recv, b"\x01" * spec["request"]
    for _ in range(WARM):
        send(frame)
        if not sock.poll(ANSWER_MS):
            raise TimeoutError(f"the echo server at {spec['endpoint']} did not answer")
        recv()

    def op(_: int) -> None:
        send(frame)
        recv()

    return lambda: timing.each(op, range(spec["count"]))


def _frames(buf: bytes) -> tuple[int, bytes]:
    """(how many whole length-prefixed frames ``buf`` starts with, the bytes after them)."""
    n, pos, size = 0, 0, len(buf)
    while size - pos >= 4:
        end = pos + 4 + int.from_bytes(buf[pos:pos + 4], "big")
        if end > size:
            break
        n, pos = n + 1, end
    return n, buf[pos:]


def unix_echo(path: str, reply_size: int, commit_spec: dict[str, Any] | None = None) -> None:
    """The unix round trip's server: answers every length-prefixed frame with ``reply_size``
    bytes behind their length, as an owner answers on its unix socket; one client at a time;
    runs until terminated. With ``commit_spec``, each answer only after one commit of
    ``_committer(commit_spec)`` (a row, its client record and a change-log record): the
    smallest owner, whose round trip is the single put's floor (the socket, the commit and the
    wake-ups around them, no lmshard code)."""
    import socket

    commit_group = None if commit_spec is None else _committer(commit_spec)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    reply = reply_size.to_bytes(4, "big") + b"\x00" * reply_size
    seq = 0
    while True:
        conn, _ = listener.accept()
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            n, buf = _frames(buf + data)
            for _ in range(n):
                if commit_group is not None:
                    commit_group([(0, seq)])
                    seq += 1
                conn.sendall(reply)
        conn.close()


def unix_group_server(path: str, commit_spec: dict[str, Any]) -> None:
    """The smallest owner that commits as a group: every frame its clients have sent when it
    looks (an epoll over their connections) goes into one commit of ``_committer(commit_spec)``,
    then each is answered; runs until terminated. Several of them, with clients spreading
    their requests over them, are the floor of many clients' single puts."""
    import selectors
    import socket

    commit_group = _committer(commit_spec)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    reply = PUT_REPLY.to_bytes(4, "big") + b"\x00" * PUT_REPLY
    state: dict[Any, list[Any]] = {}  # connection -> [client number, next seq, buffered bytes]
    while True:
        group: list[tuple[int, int]] = []
        answers: list[tuple[Any, int]] = []
        for key, _ in sel.select():
            conn = key.fileobj
            if conn is listener:
                conn, _ = listener.accept()
                state[conn] = [len(state), 0, b""]
                sel.register(conn, selectors.EVENT_READ)
                continue
            data = conn.recv(65536)  # type: ignore[union-attr]
            if not data:
                sel.unregister(conn)
                conn.close()  # type: ignore[union-attr]
                del state[conn]
                continue
            st = state[conn]
            n, st[2] = _frames(st[2] + data)
            group.extend((st[0], st[1] + i) for i in range(n))
            st[1] += n
            answers.append((conn, n))
        if group:
            commit_group(group)
        for conn, n in answers:
            conn.sendall(reply * n)


def _unix_connect(path: str) -> Any:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + ANSWER_MS / 1000
    while True:
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {path} did not listen") from None
            time.sleep(0.01)


def unix_round_trip(spec: dict[str, Any]) -> Run:
    """The unix round trip's client: one frame of ``request`` bytes behind its length, then a
    blocking read of the whole answer, ``count`` times, each timed; to the server at ``path``,
    or to each of ``paths`` in turn (as a client's puts spread over the shards)."""
    socks = [_unix_connect(p) for p in spec.get("paths") or [spec["path"]]]
    frame = spec["request"].to_bytes(4, "big") + b"\x01" * spec["request"]
    want = 4 + PUT_REPLY
    ends = [(s.sendall, s.recv) for s in socks]
    n = len(ends)

    def op(i: int) -> None:
        send, recv = ends[i % n]
        send(frame)
        got = recv(65536)
        while len(got) < want:
            got += recv(65536)

    for _ in range(WARM):
        op(0)
    count, items = spec["count"], spec.get("items_per_op", 1)
    return lambda: (count * items, timing.each(op, range(count))[1])


def _committer(spec: dict[str, Any]) -> Any:
    """``commit(group)``: one write transaction putting, for each ``(client, seq)`` of the
    group, a row into ``records`` and the client's record into ``__clients__`` (and with
    ``log`` a change-log record into ``__changes__``), in an environment at ``path`` opened with
    ``sync`` and filled with ``fill`` rows first. Client c's seq-th row is row ``start + c *
    10**7 + seq``, its value encoded before, as a client sends it encoded."""
    import itertools

    import cbor2
    import lmdb
    import msgpack

    env = lmdb.open(spec["path"], map_size=1 << 30, max_dbs=4, sync=spec["sync"], lock=True)
    with env.begin(write=True) as txn:
        rows = env.open_db(b"records", txn=txn)
        clients = env.open_db(b"__clients__", txn=txn)
        changes = env.open_db(b"__changes__", txn=txn) if spec.get("log") else None
        for i in range(spec["fill"]):
            txn.put(i.to_bytes(8, "big"), cbor2.dumps(record(i)), db=rows)
    env.sync(True)
    start, count = spec["start"], WARM + spec["count"]
    chunk = spec.get("chunk")
    values = ([cbor2.dumps(record(start + i)) for i in range(count)] if chunk is None
              else [bytes(range(256)) * (chunk // 256) + b"\x00" * (chunk % 256)])
    head = b"\x00" * 24 if chunk is not None else None
    begin, packb, log_ids = env.begin, msgpack.packb, itertools.count()
    reply = b"\x00" * PUT_REPLY

    def commit_group(group: list[tuple[int, int]]) -> None:
        with begin(write=True) as txn:
            for client, seq in group:
                key = (start + client * 10**7 + seq).to_bytes(8, "big")
                value = values[seq % len(values)]
                effects = [[b"t" * 16, key, value]]
                txn.put(key, value, db=rows)
                if head is not None:  # a time series append: the chunk and the series' head
                    txn.put(b"h%015d" % client, head, db=rows)
                    effects.append([b"t" * 16, b"h%015d" % client, head])
                txn.put(b"c%015d" % client, packb(
                    [seq, 0, reply, [], int(time.time()), 1], use_bin_type=True), db=clients)
                if changes is not None:
                    txn.put(next(log_ids).to_bytes(8, "big"), packb(
                        [int(time.time() * 1000), effects], use_bin_type=True), db=changes)

    return commit_group


def commit(spec: dict[str, Any]) -> Run:
    """One write transaction per op (``_committer``), in this process, each timed."""
    commit_group = _committer(spec)

    def op(seq: int) -> None:
        commit_group([(0, seq)])

    for seq in range(WARM):
        op(seq)
    return lambda: timing.each(op, range(WARM, WARM + spec["count"]))


# -- one round's measurements ------------------------------------------------------------------


def measure(base: Path, round_trips: int, sync_commits: int, commits: int, fill: int,
            group_each: int, appends: int) -> Iterator[tuple[str, Sample]]:
    """Each part once, in turn: ``round_trips`` round trips of each size, ``sync_commits``
    commits with fsync and ``commits`` without, ``group_each`` puts of each of GROUP_CLIENTS
    clients to the group-committing servers, ``appends`` time series chunks; in a directory
    made under ``base``."""
    with tempfile.TemporaryDirectory(prefix="floors-", dir=base) as name:
        yield from _measure(Path(name), round_trips, sync_commits, commits, fill, group_each,
                            appends)


Servers = list[tuple[Any, tuple[Any, ...]]]
"""A part's server processes: (function, arguments) each."""


def _measure(tmp: Path, round_trips: int, sync_commits: int, commits: int, fill: int,
             group_each: int, appends: int) -> Iterator[tuple[str, Sample]]:
    trips: list[tuple[str, Servers, Any, list[dict[str, Any]]]] = [
        (key, [(echo, (f"ipc://{tmp}/{key}.sock", reply))], round_trip,
         [{"endpoint": f"ipc://{tmp}/{key}.sock", "request": request, "count": round_trips}])
        for key, request, reply in (("rtt_put", PUT_REQUEST, PUT_REPLY),
                                    ("rtt_get", GET_REQUEST, GET_REPLY))]
    path = str(tmp / "rtt_unix_put.sock")
    trips.append(("rtt_unix_put", [(unix_echo, (path, PUT_REPLY))], unix_round_trip,
                  [{"path": path, "request": PUT_REQUEST, "count": round_trips}]))
    for key, sync, count in (("served_sync", True, sync_commits),
                             ("served_nosync", False, commits)):
        path = str(tmp / f"{key}.sock")
        served = {"path": str(tmp / key), "sync": sync, "fill": fill, "start": 10**9,
                  "count": count, "log": True}
        trips.append((key, [(unix_echo, (path, PUT_REPLY, served))], unix_round_trip,
                      [{"path": path, "request": PUT_REQUEST, "count": count}]))
    path = str(tmp / "served_chunk_sync.sock")
    chunk_spec = {"path": str(tmp / "served_chunk_sync"), "sync": True, "fill": 0,
                  "start": 10**9, "count": appends, "log": True, "chunk": CHUNK_BYTES}
    trips.append(("served_chunk_sync", [(unix_echo, (path, PUT_REPLY, chunk_spec))],
                  unix_round_trip, [{"path": path, "request": CHUNK_BYTES + 100,
                                     "count": appends, "items_per_op": CHUNK_POINTS}]))
    for key, sync in (("served8_sync", True), ("served8_nosync", False)):
        paths = [str(tmp / f"{key}-{n}.sock") for n in range(SHARDS)]
        servers: Servers = [(unix_group_server, (p, {
            "path": str(tmp / f"{key}-{n}"), "sync": sync, "fill": fill, "start": 10**9,
            "count": group_each, "log": True})) for n, p in enumerate(paths)]
        trips.append((key, servers, unix_round_trip, [
            {"paths": paths[c % SHARDS:] + paths[:c % SHARDS], "request": PUT_REQUEST,
             "count": group_each} for c in range(GROUP_CLIENTS)]))
    for key, serve, client, specs in trips:
        procs = [context().Process(target=f, args=args, daemon=True) for f, args in serve]
        for proc in procs:
            proc.start()
        try:
            yield key, run_workers(client, specs, [p.pid for p in procs if p.pid is not None])
        finally:
            for proc in procs:
                proc.terminate()
                proc.join(timeout=10)
    for key, sync, log, count in (("commit_sync", True, False, sync_commits),
                                  ("commit_nosync", False, False, commits),
                                  ("commit_log_sync", True, True, sync_commits),
                                  ("commit_log_nosync", False, True, commits)):
        yield key, run_workers(commit, [{"path": str(tmp / key), "sync": sync, "fill": fill,
                                         "start": 10**9, "count": count, "log": log}])


# -- the summary (results.json's "floors") -----------------------------------------------------


def _p50_us(samples: list[Sample]) -> float:
    return float(np.percentile(np.concatenate([s.latencies_ns for s in samples]), 50)) / 1000


def summarize(samples: dict[str, list[Sample]]) -> dict[str, Any] | None:
    """Each part's rates, p50 and p99 (pooled over rounds, and p50 per round), and the derived
    floors: a rate from the p50s of their parts, pooled and per round."""
    if not samples:
        return None
    parts: dict[str, Any] = {}
    for p in PARTS:
        got = samples.get(p.key)
        if not got:
            continue
        lat = np.concatenate([s.latencies_ns for s in got])
        p50, p99 = np.percentile(lat, [50, 99]) / 1000
        parts[p.key] = {
            "label": p.label, "rates": [round(s.rate, 1) for s in got],
            "median": float(np.median([s.rate for s in got])), "p50_us": round(float(p50), 2),
            "p99_us": round(float(p99), 2), "p50_us_per_round": [
                round(_p50_us([s]), 2) for s in got], "ops": [s.ops for s in got]}
    derived: dict[str, Any] = {}
    for workload, (trip, commit_part, what) in DERIVED.items():
        if trip not in parts or commit_part not in parts:
            continue
        a, b = parts[trip], parts[commit_part]
        derived[workload] = {
            "what": what, "parts": [trip, commit_part],
            "p50_us": round(a["p50_us"] + b["p50_us"], 2),
            "rate": round(1e6 / (a["p50_us"] + b["p50_us"]), 1),
            "rates": [round(1e6 / (x + y), 1) for x, y in zip(
                a["p50_us_per_round"], b["p50_us_per_round"], strict=False)]}
    return {"parts": parts, "derived": derived}
