"""Taking a backup: the coordinator's side of the backup socket (``lmshard.backup_wire``).

It connects a DEALER to every owner's backup socket and

1. sends ``PAUSE`` to every owner; each finishes the group commit in progress, holds later write
   batches in its socket and answers ``PAUSED`` with its last txn id (phase 1 of the barrier);
2. once all are paused, sends ``SNAPSHOT``: each owner opens a read transaction (the cut), lifts
   its pause and answers ``READY``. With ``consistent=False`` step 1 is skipped.

   If an owner does not answer in time (it is stopped, or starved of CPU), or refuses, the
   attempt is abandoned (``CANCEL`` and ``RESUME`` to every owner) and the cut is tried again,
   up to ``CUT_ATTEMPTS`` times. Every message carries its attempt's id, so a late answer to an
   abandoned attempt is recognised, and a snapshot it opened is cancelled;
3. receives every owner's compacted copy at once in chunks, never more than the ``CREDIT`` it
   granted (the ZeroMQ guide's file-transfer pattern), so memory stays bounded on both sides and
   the backup can go to another host;
4. writes the manifest and renames ``.lmshard-<time>.partial`` to ``lmshard-<time>``.

While ``lmshard reshard`` runs a backup is refused (BackupError): its state file is there, or a
copy records moving slots or another slot map version than the config's (the re-shard started
while the backup was cut).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cbor2
import zmq
from zmq.utils.monitor import recv_monitor_message

from lmshard import __version__, security
from lmshard.backup_wire import (
    CANCEL,
    CHUNK,
    CREDIT,
    END,
    ERROR,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    NO_ATTEMPT,
    PAUSE,
    PAUSED,
    READY,
    RESUME,
    SESSION_SIZE,
    SNAPSHOT,
    decode,
    pack,
)
from lmshard.config import Config, ConfigError
from lmshard.errors import BackupError, Error, ProtocolError
from lmshard.ops.backup.copies import fsync_dir, open_copy, write_durably
from lmshard.ops.backup.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardFile,
    check_keep,
    new_backup_name,
    prune,
    shard_file_name,
)
from lmshard.ops.backup.progress import QUIET, Progress
from lmshard.slot_state import META_VERSION, read_slot_state
from lmshard.store_meta import meta_records
from lmshard.units import format_bytes
from lmshard.wire import Message

CHUNK_SIZE = 256 * 2**10
"""Bytes per streamed chunk: 256 KiB."""
PIPELINE = 8
"""Chunks of credit the coordinator keeps outstanding per shard (2 MiB at the default size)."""
PAUSE_TIMEOUT = 2.0
"""Seconds an owner holds a commit pause before lifting it by itself (a vanished coordinator)."""
BARRIER_TIMEOUT = 1.5
"""Seconds the coordinator waits for every owner's answer in each barrier phase."""
CUT_ATTEMPTS = 3
"""Tries at the consistent cut before the backup fails (an owner stopped for a moment, or
starved of CPU, answers too late for one attempt)."""
CUT_RETRY_DELAY = 0.2
"""Seconds between two attempts at the cut: the writes held by the last one drain first."""
STALL_TIMEOUT = 30.0
"""Seconds a stream may stay silent before the coordinator gives the shard up."""
POLL_MS = 100
"""How long the stream loop waits for input before it looks for stalled shards."""


@dataclass
class BackupResult:
    """A backup just taken: its directory, its manifest, the old backups ``keep`` removed."""

    path: Path
    manifest: Manifest
    pruned: list[Path] = field(default_factory=list)
    cut_attempts: int = 1
    """The attempt at the consistent cut that succeeded (1 without a consistent cut)."""


class _CutFailed(BackupError):
    """One attempt at the cut failed in a way the next attempt may not: an owner answered too
    late or refused (its pause expired, another backup held it)."""


class _OwnerError(BackupError):
    """An owner's ERROR to this attempt; ``error_code`` is its lmshard error code."""

    def __init__(self, message: str, *, code: int, hint: str | None) -> None:
        super().__init__(message, hint=hint)
        self.error_code = code


class _ShardLink:
    """The coordinator's DEALER to one owner's backup socket, and the file its copy goes to."""

    def __init__(self, ctx: zmq.Context[Any], config: Config, shard: int, session: bytes,
                 endpoint: str | None = None) -> None:
        self.shard = shard
        self.session = session
        self.endpoint = endpoint or config.backup_endpoint(shard)
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)  # so a last CANCEL or RESUME still goes out
        security.secure_client(sock, config, self.endpoint)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self.sock = sock
        self.attempt = 1
        self.txn_id = 0
        self.estimate = 0
        self.paused_ms: float | None = None
        self.size = 0
        self.granted = 0
        self.received = 0
        self.sha = hashlib.sha256()
        self.file: IO[bytes] | None = None
        self.path: Path | None = None
        self.done = False
        self.last = time.monotonic()

    def send(self, m: Message, *values: Any, attempt: int | None = None) -> None:
        """Send ``m`` for this link's attempt (or ``attempt``)."""
        self.sock.send(pack(m, self.session, attempt or self.attempt, *values))

    def begin_attempt(self, attempt: int) -> None:
        self.attempt, self.txn_id, self.estimate, self.paused_ms = attempt, 0, 0, None

    def recv(self) -> tuple[Message, list[Any], bytes | None] | None:
        """The owner's next message of this attempt; None for one of an abandoned attempt
        (a snapshot it opened is cancelled). _OwnerError if it is ERROR."""
        frames = self.sock.recv_multipart()
        self.last = time.monotonic()
        m, session, attempt, values, data = decode(frames, "owner")
        if session != self.session and m is not ERROR:
            raise ProtocolError(f"shard {self.shard} answered for another session")
        if attempt not in (self.attempt, NO_ATTEMPT):
            if m is READY:
                self.send(CANCEL, attempt=attempt)
            return None
        if m is ERROR:
            code, message, hint = values
            raise _OwnerError(f"shard {self.shard}: {message}", code=code, hint=hint)
        return m, values, data

    def give_up(self) -> None:
        """Tell the owner to drop this attempt's stream and pause, if it still listens."""
        with contextlib.suppress(zmq.ZMQError):
            self.send(CANCEL)
            self.send(RESUME)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()


def take_backup(
    config: Config,
    dest: str | os.PathLike[str],
    *,
    consistent: bool = True,
    keep: int | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
    pipeline: int = PIPELINE,
    pause_timeout: float = PAUSE_TIMEOUT,
    barrier_timeout: float = BARRIER_TIMEOUT,
    cut_attempts: int = CUT_ATTEMPTS,
    stall_timeout: float = STALL_TIMEOUT,
) -> BackupResult:
    """Back up every shard of the running service into a new directory in ``dest``.

    With ``consistent`` (the default) all shards are cut at one point in time by a brief
    commit barrier, tried up to ``cut_attempts`` times; otherwise each shard is snapshotted on
    its own. ``keep`` deletes all but the newest ``keep`` backups in ``dest`` afterwards. On
    any failure the partial backup is removed and BackupError says which shard failed and why.
    """
    if keep is not None:
        check_keep(keep)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise BackupError(f"chunk_size {chunk_size} is not in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if cut_attempts < 1:
        raise BackupError(f"cut_attempts {cut_attempts}: try the cut at least once")
    refuse_during_reshard(config)
    progress = progress or QUIET
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    name = new_backup_name(dest)
    partial = dest / f".{name}.partial"
    partial.mkdir()
    ctx: zmq.Context[Any] = zmq.Context.instance()
    session = os.urandom(SESSION_SIZE)
    links: list[_ShardLink] = []
    try:
        for n in range(config.shards):
            links.append(_ShardLink(ctx, config, n, session))
        created = datetime.datetime.now(datetime.UTC)
        barrier = _Barrier(pause_timeout, barrier_timeout, cut_attempts, chunk_size)
        barrier_ms = _open_snapshots(links, consistent, progress, barrier)
        _stream(links, partial, progress, pipeline, stall_timeout)
        manifest = _manifest(config, links, created, consistent, barrier_ms)
        manifest.seconds = round(time.monotonic() - started, 3)
        write_durably(partial / MANIFEST_NAME, manifest.to_json().encode())
        final = dest / name
        os.replace(partial, final)
        fsync_dir(dest)
    except BaseException as exc:
        _abandon(links, partial, progress, exc)
        if isinstance(exc, Error) and not isinstance(exc, ConfigError):
            raise BackupError(f"backup failed: {exc.message}; removed the partial backup "
                              f"{partial}", hint=exc.hint) from exc
        raise
    for ln in links:
        ln.close()
    pruned = prune(dest, keep) if keep is not None else []
    return BackupResult(final, manifest, pruned, links[0].attempt)


def take_shard_snapshot(
    config: Config,
    shard: int,
    dest: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    pipeline: int = PIPELINE,
    ready_timeout: float = 10.0,
    stall_timeout: float = STALL_TIMEOUT,
) -> tuple[Path, int]:
    """A snapshot of one shard on its own (no cut with the others), from the backup socket at
    ``endpoint`` (the shard's own by default; a replica takes its primary's), written into
    directory ``dest`` and fsynced: ``(the file, the txn id it was taken at)``. The file is a
    compacted LMDB copy (``subdir=False``). BackupError if the owner does not answer within
    ``ready_timeout`` seconds, refuses, or goes away; nothing is left in ``dest`` then."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    link = _ShardLink(zmq.Context.instance(), config, shard, os.urandom(SESSION_SIZE), endpoint)
    try:
        _open_snapshots([link], False, QUIET, _Barrier(0.0, ready_timeout, 1, chunk_size))
        _stream([link], dest, QUIET, pipeline, stall_timeout)
    except BaseException:
        if not link.done:
            link.give_up()
        link.close()
        if link.path is not None:
            with contextlib.suppress(FileNotFoundError):
                link.path.unlink()
        raise
    link.close()
    assert link.path is not None
    return link.path, link.txn_id


def _abandon(links: list[_ShardLink], partial: Path, progress: Progress,
             exc: BaseException) -> None:
    """After a failure: tell the shards still streaming, close every link, remove ``partial``."""
    for ln in links:
        if not ln.done:
            progress.failed(ln.shard, str(exc.args[0]) if exc.args else type(exc).__name__)
            ln.give_up()
    for ln in links:
        ln.close()
    shutil.rmtree(partial, ignore_errors=True)


@dataclass
class _Barrier:
    """How the cut is taken: each owner's pause, the wait per phase, the tries, the chunks."""

    pause_timeout: float
    barrier_timeout: float
    attempts: int
    chunk_size: int


def _open_snapshots(links: list[_ShardLink], consistent: bool, progress: Progress,
                    barrier: _Barrier) -> float | None:
    """Every owner's snapshot open (READY); the barrier's milliseconds if ``consistent``."""
    if not consistent:
        for ln in links:
            ln.send(SNAPSHOT, False, barrier.chunk_size)
        _collect(links, READY, barrier.barrier_timeout, _ready)
        return None
    for attempt in range(1, barrier.attempts + 1):
        try:
            barrier_ms = _cut(links, attempt, barrier)
            break
        except _CutFailed as exc:
            for ln in links:
                ln.give_up()
            if attempt == barrier.attempts:
                tries = f"{attempt} attempts" if attempt > 1 else "1 attempt"
                raise BackupError(f"no consistent cut in {tries}; the last: {exc.message}",
                                  hint=exc.hint) from None
            progress.note(f"retrying the cut (attempt {attempt + 1} of {barrier.attempts}): "
                          f"{exc.message}")
            time.sleep(CUT_RETRY_DELAY)
    again = f" (attempt {attempt} of {barrier.attempts})" if attempt > 1 else ""
    progress.note(f"consistent cut at txn ids "
                  f"{', '.join(f'{ln.shard}:{ln.txn_id}' for ln in links)}{again}; writes "
                  f"paused {max(ln.paused_ms or 0 for ln in links):.1f} ms")
    return barrier_ms


def _ready(ln: _ShardLink, values: list[Any]) -> None:
    txn_id, estimate, paused_us = values
    if ln.txn_id and txn_id != ln.txn_id:
        raise BackupError(f"shard {ln.shard} committed while paused: paused at txn {ln.txn_id}, "
                          f"snapshot at txn {txn_id}")
    ln.txn_id, ln.estimate = txn_id, estimate
    ln.paused_ms = paused_us / 1000 if ln.paused_ms is not None else None


def _paused(ln: _ShardLink, values: list[Any]) -> None:
    ln.txn_id, ln.paused_ms = values[0], 0.0


def _cut(links: list[_ShardLink], attempt: int, barrier: _Barrier) -> float:
    """One attempt at the two-phase barrier; the milliseconds from the first PAUSE to the last
    READY. _CutFailed if an owner answered too late or refused."""
    t0 = time.perf_counter()
    for ln in links:
        ln.begin_attempt(attempt)
        ln.send(PAUSE, int(barrier.pause_timeout * 1000))
    try:
        _collect(links, PAUSED, barrier.barrier_timeout, _paused)
        for ln in links:
            ln.send(SNAPSHOT, True, barrier.chunk_size)
        _collect(links, READY, barrier.barrier_timeout, _ready)
    except _OwnerError as exc:
        if exc.error_code == ProtocolError.code:
            raise
        raise _CutFailed(exc.message, hint=exc.hint) from None
    return (time.perf_counter() - t0) * 1000


def _collect(links: list[_ShardLink], expect: Message, timeout: float,
             take: Callable[[_ShardLink, list[Any]], None]) -> None:
    """One ``expect`` answer of the current attempt from every link within ``timeout``
    seconds; _CutFailed naming the shards that did not answer."""
    poller = zmq.Poller()
    for ln in links:
        poller.register(ln.sock, zmq.POLLIN)
    waiting = {ln.sock: ln for ln in links}
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        events = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
        if not events and time.monotonic() >= deadline:
            shards = [str(ln.shard) for ln in waiting.values()]
            raise _CutFailed(
                f"shard{'s' if len(shards) > 1 else ''} {', '.join(shards)} did not answer "
                f"{expect.name} within {timeout:g} s",
                hint="is every owner running (`lmshard status`)? A paused owner resumes by "
                "itself; run the backup again")
        for sock in events:
            ln = waiting[sock]
            got = ln.recv()
            if got is None:
                continue  # an answer to an abandoned attempt
            m, values, _ = got
            if m is not expect:
                raise ProtocolError(f"shard {ln.shard} answered {m.name}, expected {expect.name}")
            del waiting[sock]
            poller.unregister(sock)
            take(ln, values)


def _stream(links: list[_ShardLink], out: Path, progress: Progress, pipeline: int,
            stall_timeout: float) -> None:
    """Receive every shard's copy into ``out`` at once, granting credit as chunks arrive."""
    poller = zmq.Poller()
    by_sock: dict[Any, _ShardLink] = {}
    for ln in links:
        ln.path = out / shard_file_name(ln.shard)
        ln.file = open(ln.path, "wb")  # noqa: SIM115 - closed by _finish or close()
        progress.begin(ln.shard, ln.estimate, estimated=True)
        ln.send(CREDIT, pipeline)
        ln.granted = pipeline
        ln.last = time.monotonic()
        poller.register(ln.sock, zmq.POLLIN)
        poller.register(ln.monitor, zmq.POLLIN)
        by_sock[ln.sock] = by_sock[ln.monitor] = ln
    while not all(ln.done for ln in links):
        for sock in dict(poller.poll(POLL_MS)):
            ln = by_sock[sock]
            if sock is ln.monitor:
                _check_connected(ln)
            else:
                _receive(ln, progress, pipeline)
        _check_stalled(links, stall_timeout)


def _check_connected(ln: _ShardLink) -> None:
    """Read ``ln``'s socket event; BackupError if its owner went away mid-stream."""
    event: Any = recv_monitor_message(ln.monitor)
    if event["event"] == zmq.EVENT_DISCONNECTED and not ln.done:
        raise BackupError(
            f"shard {ln.shard}'s owner went away after {format_bytes(ln.size)} of "
            f"~{format_bytes(ln.estimate)}: its copy is incomplete",
            hint="check the owner's log (`lmshard status`), then back up again")


def _receive(ln: _ShardLink, progress: Progress, pipeline: int) -> None:
    """Take every message waiting on ``ln``: chunks, then END."""
    while not ln.done and ln.sock.poll(0):
        got = ln.recv()
        if got is None:
            continue  # a late answer to an abandoned attempt at the cut
        m, values, data = got
        if m is CHUNK:
            _take_chunk(ln, values[0], data, pipeline)
            progress.advance(ln.shard, len(data or b""))
        elif m is END:
            _finish(ln, *values)
            progress.done(ln.shard)
        else:
            raise ProtocolError(f"shard {ln.shard} sent {m.name} while streaming")


def _check_stalled(links: list[_ShardLink], stall_timeout: float) -> None:
    now = time.monotonic()
    for ln in links:
        if not ln.done and now - ln.last > stall_timeout:
            raise BackupError(
                f"shard {ln.shard} sent nothing for {stall_timeout:g} s after "
                f"{format_bytes(ln.size)}: its copy is incomplete",
                hint="is its owner running (`lmshard status`)?")


def _take_chunk(ln: _ShardLink, offset: int, data: bytes | None, pipeline: int) -> None:
    assert ln.file is not None and data is not None
    if offset != ln.size:
        raise ProtocolError(f"shard {ln.shard} sent a chunk at offset {offset}, expected "
                            f"{ln.size}")
    ln.received += 1
    if ln.received > ln.granted:
        raise ProtocolError(f"shard {ln.shard} sent more chunks than it had credit for")
    ln.file.write(data)
    ln.sha.update(data)
    ln.size += len(data)
    if ln.granted - ln.received <= pipeline // 2:  # top the window up, half a window at a time
        more = pipeline - (ln.granted - ln.received)
        ln.send(CREDIT, more)
        ln.granted += more


def _finish(ln: _ShardLink, size: int, sha256: str) -> None:
    assert ln.file is not None
    if size != ln.size or sha256 != ln.sha.hexdigest():
        raise BackupError(f"shard {ln.shard}'s copy arrived damaged: {ln.size} bytes with "
                          f"SHA-256 {ln.sha.hexdigest()}, the owner sent {size} bytes with "
                          f"{sha256}")
    ln.file.flush()
    os.fsync(ln.file.fileno())
    ln.file.close()
    ln.file = None
    ln.done = True


def _manifest(config: Config, links: list[_ShardLink], created: datetime.datetime,
              consistent: bool, barrier_ms: float | None) -> Manifest:
    """The manifest of the copies just received, each checked against the config."""
    digest = config.slot_map.digest()
    schemas = set()
    shards = []
    for ln in links:
        _check_slot_state(config, ln)
        schemas.add(json.dumps(_copy_schema(ln, digest), sort_keys=True))
        shards.append(ShardFile(ln.shard, shard_file_name(ln.shard), ln.txn_id, ln.size,
                                ln.sha.hexdigest(),
                                round(ln.paused_ms, 3) if ln.paused_ms is not None else None))
    if len(schemas) != 1:
        raise BackupError(f"the shards hold different schemas: {sorted(schemas)}")
    schema = json.loads(schemas.pop()) or {"name": None, "version": None}
    schema.update(ref=config.schema, python_path=[str(p) for p in config.python_path])
    pauses = [s.paused_ms for s in shards if s.paused_ms is not None]
    return Manifest(
        created=created.isoformat(timespec="microseconds"),
        consistent=consistent,
        shards=shards,
        slot_map=config.slot_map.to_dict(),
        slot_map_digest=digest,
        schema=schema,
        pause_ms=max(pauses) if pauses else None,
        barrier_ms=round(barrier_ms, 3) if barrier_ms is not None else None,
        lmshard_version=__version__,
    )


def refuse_during_reshard(config: Config) -> None:
    """BackupError while ``lmshard reshard`` runs (its state file is there): the shards' copies
    would hold slots on two shards at once, or none."""
    from lmshard.resharding.state import state_path  # it imports this package's files

    path = state_path(config)
    if path.exists():
        raise BackupError(f"a re-shard is under way ({path} is there): a backup now would "
                          "hold the moving slots twice or not at all",
                          hint="back up once `lmshard reshard` is done (`lmshard reshard "
                          "--status` shows it), or finish it with --resume / --rollback")


def _check_slot_state(config: Config, ln: _ShardLink) -> None:
    """BackupError if ``ln``'s copy records moving slots or another slot map version than the
    config's: a re-shard was under way when it was cut."""
    assert ln.path is not None
    with open_copy(ln.path) as env, env.begin() as txn:
        meta = meta_records(env, txn)
    if META_VERSION not in meta:
        return
    state = read_slot_state(meta, config)
    if state.moving or state.version != config.slot_map_version:
        raise BackupError(f"shard {ln.shard} records {state.describe()} and the config has "
                          f"version {config.slot_map_version}: a re-shard is under way or "
                          "did not finish", hint="back up once `lmshard reshard` is done "
                          "(`lmshard reshard --status` shows where it stands)")


def _copy_schema(ln: _ShardLink, digest: str) -> Any:
    """The schema ``ln``'s copy records (None if none); BackupError if the copy says it is
    another shard or was written under another slot map than ``digest``."""
    assert ln.path is not None
    with open_copy(ln.path) as env, env.begin() as txn:
        meta = meta_records(env, txn)
    if meta.get(b"shard_id", str(ln.shard).encode()) != str(ln.shard).encode():
        raise BackupError(f"shard {ln.shard}'s data says it is shard "
                          f"{meta[b'shard_id'].decode()}")
    if meta.get(b"slot_map", digest.encode()) != digest.encode():
        raise BackupError(f"shard {ln.shard}'s data was written with another slot map than "
                          "the config's", hint="back up with the service's own config")
    return cbor2.loads(meta[b"schema"]) if b"schema" in meta else None
