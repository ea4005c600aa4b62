"""Backups: a consistent cut across shards, streamed with credit, checked, restored.

Each shard owner serves a backup socket (``config.backup_endpoint(n)``, a ROUTER). The
coordinator here connects a DEALER to every owner and speaks the messages of ``MESSAGES``:

1. ``PAUSE`` to every owner; each finishes the group commit in progress, holds later write
   batches in its socket and answers ``PAUSED`` with its last txn id (phase 1 of the barrier).
2. Once all are paused, ``SNAPSHOT``: each owner opens a read transaction (the cut), lifts its
   pause and answers ``READY``. With ``consistent=False`` step 1 is skipped.
3. The owners stream a compacted copy of their environment from that transaction in chunks,
   never more than the ``CREDIT`` the coordinator granted (the ZeroMQ guide's file-transfer
   pattern), so memory stays bounded on both sides and the backup can go to another host.

A backup is a directory ``DEST/lmshard-<UTC time>/`` holding ``shard-NN.mdb`` files and a
``manifest.json`` (``Manifest``); it is written as ``.lmshard-<time>.partial`` and renamed when
complete. ``verify_backup`` checks files against the manifest and walks every table and index of
every copy; ``restore_backup`` lays the copies into a data dir (``shard-NN/data.mdb``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import cbor2
import lmdb
import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from lmshard import protocol, security
from lmshard.config import Config, ConfigError
from lmshard.errors import Error, ProtocolError
from lmshard.routing import SlotMap
from lmshard.schema import Schema
from lmshard.store import FORMAT_VERSION, MAX_DBS, META_DB
from lmshard.txn import ReadTxn, bind_tables

MANIFEST_FORMAT = "lmshard-backup"
MANIFEST_VERSION = 1
"""Bumped on any incompatible change of the manifest or the backup directory layout."""
MANIFEST_NAME = "manifest.json"
CHUNK_SIZE = 256 * 2**10
"""Bytes per streamed chunk: 256 KiB."""
MAX_CHUNK_SIZE = 2**20
"""Largest chunk an owner agrees to send: 1 MiB."""
PIPELINE = 8
"""Chunks of credit the coordinator keeps outstanding per shard (2 MiB at the default size)."""
MAX_IN_FLIGHT = 8 * 2**20
"""Most bytes of granted, unsent credit an owner keeps per stream: 8 MiB; more is ignored."""
PAUSE_TIMEOUT = 2.0
"""Seconds an owner holds a commit pause before lifting it by itself (a vanished coordinator)."""
MAX_PAUSE_TIMEOUT = 10.0
"""The longest pause a coordinator may ask for, in seconds."""
BARRIER_TIMEOUT = 1.5
"""Seconds the coordinator waits for every owner's answer in each barrier phase."""
STALL_TIMEOUT = 30.0
"""Seconds a stream may stay silent before the coordinator gives the shard up."""
REPORT_INTERVAL = 1.0
"""Seconds between two progress lines of one shard."""
READ_BLOCK = 4 * 2**20
"""Bytes read at a time when hashing or copying a backup file: 4 MiB."""
MAX_CONTROL_FRAME = 64 * 2**10
"""Largest control frame either side decodes (chunk data travels in a frame of its own)."""

_BACKUP_DIR_RE = re.compile(r"lmshard-\d{8}T\d{6}(\.\d{6})?Z(-\d+)?")
_MDB_DB = struct.Struct("=IHHQQQQQ")  # LMDB's MDB_db record (64-bit pgno_t and size_t)
_DB_FLAGS = {0x02: "reverse_key", 0x04: "dupsort", 0x08: "integerkey", 0x10: "dupfixed",
             0x20: "integerdup"}


class BackupError(Error):
    """A backup, verify or restore could not be done; the message says which shard and why."""

    hint = "nothing was changed; fix the cause and run the command again"


# --------------------------------------------------------------------------------------------
# The backup socket's messages: one registry, both sides
# --------------------------------------------------------------------------------------------


def _uint(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**63


def _count(v: Any) -> bool:
    return type(v) is int and 1 <= v <= 2**20


def _flag(v: Any) -> bool:
    return type(v) is bool


def _text(v: Any) -> bool:
    return type(v) is str and len(v) <= 4096


def _chunk_size(v: Any) -> bool:
    return type(v) is int and 4096 <= v <= MAX_CHUNK_SIZE


def _timeout_ms(v: Any) -> bool:
    return type(v) is int and 1 <= v <= MAX_PAUSE_TIMEOUT * 1000


def _hint(v: Any) -> bool:
    return v is None or _text(v)


@dataclass(frozen=True)
class Message:
    """One message of the backup socket. Its docstring-like ``doc`` is the specification.

    A message is one frame: the protocol version byte, then a msgpack array
    ``[code, session, *fields]``; the session is 16 bytes the coordinator picks per backup.
    A message with ``data`` is followed by a second frame holding raw bytes.
    """

    code: int
    name: str
    sender: str
    fields: tuple[tuple[str, Callable[[Any], bool]], ...]
    doc: str
    data: bool = False

    def pack(self, session: bytes, *values: Any) -> bytes:
        if len(values) != len(self.fields):
            raise TypeError(f"{self.name} takes {len(self.fields)} fields, got {len(values)}")
        return protocol.VERSION_BYTE + msgpack.packb(
            [self.code, session, *values], use_bin_type=True
        )


MESSAGES: tuple[Message, ...] = (
    Message(1, "PAUSE", "coordinator", (("timeout_ms", _timeout_ms),),
            "Phase 1 of a consistent cut. The owner finishes the group commit in progress, "
            "holds later write batches in its socket (they are not lost, only delayed) and "
            "answers PAUSED. If neither SNAPSHOT nor RESUME of this session follows within "
            "timeout_ms, the owner lifts the pause by itself. One pause per owner at a time: "
            "a second session gets ERROR."),
    Message(2, "SNAPSHOT", "coordinator", (("consistent", _flag), ("chunk_size", _chunk_size)),
            "Open the snapshot: the owner begins a read transaction and answers READY. With "
            "consistent=true this is phase 2 of the cut: the session must hold the pause, which "
            "is lifted once the transaction is open. With consistent=false no pause is needed. "
            "The owner then copies its environment, compacted, from that transaction and sends "
            "it in CHUNKs of at most chunk_size bytes as CREDIT allows."),
    Message(3, "CREDIT", "coordinator", (("chunks", _count),),
            "Permission to send this many more CHUNKs. The coordinator keeps several chunks "
            "of credit outstanding so the stream never waits for a round trip; the owner never "
            "sends a chunk it has no credit for (and keeps at most 8 MiB of credit)."),
    Message(4, "RESUME", "coordinator", (),
            "Lift this session's pause without a snapshot (the cut is abandoned). Answered by "
            "RESUMED, also when the session holds no pause."),
    Message(5, "CANCEL", "coordinator", (),
            "Stop this session's stream and release its read transaction. Not answered."),
    Message(101, "PAUSED", "owner", (("txn_id", _uint),),
            "The owner is paused; txn_id is the last transaction it committed."),
    Message(102, "READY", "owner",
            (("txn_id", _uint), ("estimate", _uint), ("paused_us", _uint)),
            "The snapshot is open at txn_id and the pause (if any) is lifted. estimate is the "
            "expected size of the compacted copy in bytes; paused_us how long writes were held "
            "(0 without a pause)."),
    Message(103, "CHUNK", "owner", (("offset", _uint),),
            "The bytes of the copy at offset, in the data frame that follows; uses one credit. "
            "Chunks arrive in order; an empty stream sends none.", data=True),
    Message(104, "END", "owner", (("size", _uint), ("sha256", _text)),
            "The copy is complete: size bytes in all, with this SHA-256 (hex). The owner has "
            "released the read transaction."),
    Message(105, "RESUMED", "owner", (),
            "Answer to RESUME: this session holds no pause any more."),
    Message(199, "ERROR", "owner", (("code", _uint), ("message", _text), ("hint", _hint)),
            "The request failed or the stream broke; code is an lmshard error code. A stream "
            "that gets ERROR is over and its read transaction released."),
)
"""Every message of the backup socket; ``docs/backup.md`` shows them (``protocol_markdown``)."""

BY_CODE = {m.code: m for m in MESSAGES}
BY_NAME = {m.name: m for m in MESSAGES}
PAUSE, SNAPSHOT, CREDIT, RESUME, CANCEL = (BY_NAME[n] for n in (
    "PAUSE", "SNAPSHOT", "CREDIT", "RESUME", "CANCEL"))
PAUSED, READY, CHUNK, END, RESUMED, ERROR = (BY_NAME[n] for n in (
    "PAUSED", "READY", "CHUNK", "END", "RESUMED", "ERROR"))


def decode(frames: list[bytes], sender: str) -> tuple[Message, bytes, list[Any], bytes | None]:
    """``(message, session, field values, data)`` of a message from ``sender``, checked.

    Raises ProtocolError naming what is wrong; nothing in a frame is trusted.
    """
    if not frames or len(frames) > 2:
        raise ProtocolError(f"a backup message has 1 or 2 frames, this one {len(frames)}")
    msg = protocol.unpack_frame(frames[0], MAX_CONTROL_FRAME)
    if len(msg) < 2 or type(msg[0]) is not int:
        raise ProtocolError("a backup message is [code, session, fields...]")
    m = BY_CODE.get(msg[0])
    if m is None or m.sender != sender:
        raise ProtocolError(f"unknown backup message code {msg[0]}")
    session, values = msg[1], msg[2:]
    if type(session) is not bytes or len(session) not in (0, 16):
        raise ProtocolError(f"{m.name}: the session must be 16 bytes")
    if len(values) != len(m.fields):
        raise ProtocolError(f"{m.name} has {len(m.fields)} fields, this one {len(values)}")
    for (name, check), value in zip(m.fields, values, strict=True):
        if not check(value):
            raise ProtocolError(f"{m.name}: bad {name} {value!r:.60}")
    data = frames[1] if len(frames) == 2 else None
    if m.data != (data is not None):
        raise ProtocolError(f"{m.name} {'needs' if m.data else 'takes no'} data frame")
    return m, session, values, data


def protocol_markdown() -> str:
    """The message table of ``docs/backup.md``, generated from ``MESSAGES``."""
    lines = ["| code | message | sent by | fields | meaning |", "|---|---|---|---|---|"]
    for m in MESSAGES:
        fields = ", ".join(name for name, _ in m.fields) + (" + data frame" if m.data else "")
        lines.append(f"| {m.code} | `{m.name}` | {m.sender} | {fields or '-'} | {m.doc} |")
    return "\n".join(lines) + "\n"


def copy_size_estimate(txn: lmdb.Transaction, main_db: Any, page_size: int) -> int:
    """Bytes of a compacted copy of the snapshot ``txn``: every used page plus two meta pages.

    LMDB keeps each named database's ``MDB_db`` record (with its page counts) as the value of
    its name in the main database, so this reads no page of the data itself.
    """
    st = txn.stat(main_db)
    pages = 2 + st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    for _name, rec in txn.cursor(db=main_db):
        if len(rec) == _MDB_DB.size:
            _pad, _flags, _depth, branch, leaf, overflow, _entries, _root = _MDB_DB.unpack(rec)
            pages += branch + leaf + overflow
    return pages * page_size


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """Per-shard progress as plain lines on a text stream (stderr by default).

    Each line shows bytes done of the total, the rate and the time left; a shard prints at most
    one line per ``interval`` seconds, and one when it finishes or fails. Subclass it (or pass
    ``quiet=True``) to report elsewhere; the library calls only these methods.
    """

    def __init__(self, verb: str, stream: IO[str] | None = None, *,
                 interval: float = REPORT_INTERVAL, quiet: bool = False) -> None:
        self.verb = verb
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.quiet = quiet
        self._shards: dict[int, list[Any]] = {}  # shard -> [total, estimated, done, t0, last]

    def begin(self, shard: int, total: int | None, *, estimated: bool = False) -> None:
        now = time.monotonic()
        self._shards[shard] = [total, estimated, 0, now, now]

    def advance(self, shard: int, nbytes: int) -> None:
        if self.quiet:
            return
        s = self._shards[shard]
        s[2] += nbytes
        now = time.monotonic()
        if now - s[4] >= self.interval:
            s[4] = now
            self._line(shard, "")

    def done(self, shard: int) -> None:
        self._line(shard, "done")

    def failed(self, shard: int, why: str) -> None:
        if shard in self._shards:
            self._line(shard, f"FAILED: {why}")

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.verb}: {text}", file=self.stream, flush=True)

    def _line(self, shard: int, status: str) -> None:
        if self.quiet:
            return
        total, estimated, done, t0, _ = self._shards[shard]
        seconds = max(time.monotonic() - t0, 1e-6)
        rate = done / seconds
        text = f"{self.verb} shard {shard:02d}  {format_bytes(done)}"
        if total:
            shown = max(total, done)
            text += f" / {'~' if estimated else ''}{format_bytes(shown)}"
            text += f"  {min(100.0, 100.0 * done / shown):5.1f}%"
        text += f"  {format_bytes(rate)}/s"
        if status:
            text += f"  {seconds:.1f}s  {status}"
        elif total and rate > 0:
            text += f"  ETA {max(0.0, (total - done) / rate):.0f}s"
        print(text, file=self.stream, flush=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_QUIET = Progress("", quiet=True)


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


@dataclass
class ShardFile:
    """One shard's copy in a backup."""

    shard: int
    file: str
    txn_id: int
    size: int
    sha256: str
    paused_ms: float | None = None


@dataclass
class Manifest:
    """What ``manifest.json`` of a backup records (``format_version`` guards the layout)."""

    created: str
    consistent: bool
    shards: list[ShardFile]
    slot_map: dict[str, Any]
    slot_map_digest: str
    schema: dict[str, Any]
    store_format: int = FORMAT_VERSION
    pause_ms: float | None = None
    barrier_ms: float | None = None
    seconds: float | None = None
    lmshard_version: str = ""
    format: str = MANIFEST_FORMAT
    format_version: int = MANIFEST_VERSION

    @property
    def shard_ids(self) -> list[int]:
        return [s.shard for s in self.shards]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d["shard_ids"] = self.shard_ids
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read and check ``path``; BackupError saying what is wrong with it otherwise."""
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise BackupError(f"{path} is missing: not a complete lmshard backup",
                              hint="a backup without its manifest cannot be checked or "
                              "restored; use another backup") from None
        except (OSError, ValueError) as exc:
            raise BackupError(f"cannot read {path}: {exc}") from None
        try:
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {MANIFEST_FORMAT!r}")
            if d.get("format_version") != MANIFEST_VERSION:
                raise ValueError(f"format_version {d.get('format_version')!r} is not "
                                 f"{MANIFEST_VERSION} (the one this lmshard reads)")
            d.pop("shard_ids", None)
            shards = [ShardFile(**s) for s in d.pop("shards")]
            m = cls(shards=shards, **d)
            SlotMap.from_dict(m.slot_map)
            if sorted(m.shard_ids) != list(range(len(shards))):
                raise ValueError(f"shard ids {m.shard_ids} are not 0..{len(shards) - 1}")
            for s in shards:
                if s.file != shard_file_name(s.shard):
                    raise ValueError(f"shard {s.shard}'s file is {s.file!r}")
            if not isinstance(m.schema.get("name"), str):
                raise ValueError("schema has no name")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(f"{path} is not a valid backup manifest: {exc}") from None
        return m


def shard_file_name(shard: int) -> str:
    return f"shard-{shard:02d}.mdb"


def find_backup(path: str | os.PathLike[str]) -> Path:
    """The backup at ``path``: a backup directory, or the newest complete one inside it."""
    p = Path(path)
    if (p / MANIFEST_NAME).exists():
        return p
    if p.is_dir():
        found = list_backups(p)
        if found:
            return found[-1]
    raise BackupError(f"no lmshard backup at {p}",
                      hint="give a backup directory (it holds manifest.json) or the DEST "
                      "directory `lmshard backup` wrote to")


def list_backups(dest: Path) -> list[Path]:
    """Complete backups in ``dest`` (named ``lmshard-<time>``, with a manifest), oldest first."""
    if not dest.is_dir():
        return []
    return sorted(p for p in dest.iterdir()
                  if _BACKUP_DIR_RE.fullmatch(p.name) and (p / MANIFEST_NAME).is_file())


def prune(dest: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete backups in ``dest``; the ones deleted."""
    if keep < 1:
        raise BackupError(f"--keep {keep}: keep at least 1 backup")
    old = list_backups(Path(dest))[:-keep]
    for p in old:
        shutil.rmtree(p)
    return old


# --------------------------------------------------------------------------------------------
# Taking a backup
# --------------------------------------------------------------------------------------------


@dataclass
class BackupResult:
    path: Path
    manifest: Manifest
    pruned: list[Path] = field(default_factory=list)


class _ShardLink:
    """The coordinator's DEALER to one owner's backup socket, and the file its copy goes to."""

    def __init__(self, ctx: zmq.Context[Any], config: Config, shard: int, session: bytes) -> None:
        self.shard = shard
        self.session = session
        self.endpoint = config.backup_endpoint(shard)
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)  # so a last CANCEL or RESUME still goes out
        security.secure_client(sock, config, self.endpoint)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self.sock = sock
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

    def send(self, m: Message, *values: Any) -> None:
        self.sock.send(m.pack(self.session, *values))

    def recv(self) -> tuple[Message, list[Any], bytes | None]:
        frames = self.sock.recv_multipart()
        self.last = time.monotonic()
        m, session, values, data = decode(frames, "owner")
        if session != self.session and m is not ERROR:
            raise ProtocolError(f"shard {self.shard} answered for another session")
        if m is ERROR:
            code, message, hint = values
            raise BackupError(f"shard {self.shard}: {message}", hint=hint)
        return m, values, data

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
    stall_timeout: float = STALL_TIMEOUT,
) -> BackupResult:
    """Back up every shard of the running service into a new directory in ``dest``.

    With ``consistent`` (the default) all shards are cut at one point in time by a brief
    commit barrier; otherwise each shard is snapshotted on its own. ``keep`` deletes all but
    the newest ``keep`` backups in ``dest`` afterwards. On any failure the partial backup is
    removed and BackupError says which shard failed and why.
    """
    if keep is not None and keep < 1:
        raise BackupError(f"--keep {keep}: keep at least 1 backup")
    if not 4096 <= chunk_size <= MAX_CHUNK_SIZE:
        raise BackupError(f"chunk_size {chunk_size} is not in 4096..{MAX_CHUNK_SIZE}")
    progress = progress or _QUIET
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    name = _new_backup_name(dest)
    partial = dest / f".{name}.partial"
    partial.mkdir()
    ctx: zmq.Context[Any] = zmq.Context.instance()
    session = os.urandom(16)
    links: list[_ShardLink] = []
    try:
        for n in range(config.shards):
            links.append(_ShardLink(ctx, config, n, session))
        created = datetime.datetime.now(datetime.UTC)
        if consistent:
            barrier_ms = _cut(links, pause_timeout, barrier_timeout, chunk_size)
            progress.note(f"consistent cut at txn ids "
                          f"{', '.join(f'{ln.shard}:{ln.txn_id}' for ln in links)}; writes "
                          f"paused {max(ln.paused_ms or 0 for ln in links):.1f} ms")
        else:
            barrier_ms = None
            for ln in links:
                ln.send(SNAPSHOT, False, chunk_size)
            _collect(links, READY, barrier_timeout, _ready)
        _stream(links, partial, progress, pipeline, stall_timeout)
        manifest = _manifest(config, links, partial, created, consistent, barrier_ms)
        manifest.seconds = round(time.monotonic() - started, 3)
        _write_durably(partial / MANIFEST_NAME, manifest.to_json().encode())
        final = dest / name
        os.replace(partial, final)
        _fsync_dir(dest)
    except BaseException as exc:
        for ln in links:
            if not ln.done:
                progress.failed(ln.shard, str(exc.args[0]) if exc.args else type(exc).__name__)
                with contextlib.suppress(zmq.ZMQError):
                    ln.send(CANCEL)
                    ln.send(RESUME)
        for ln in links:
            ln.close()
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, Error) and not isinstance(exc, ConfigError):
            raise BackupError(f"backup failed: {exc.message}; removed the partial backup "
                              f"{partial}", hint=exc.hint) from exc
        raise
    for ln in links:
        ln.close()
    pruned = prune(dest, keep) if keep is not None else []
    return BackupResult(final, manifest, pruned)


def _new_backup_name(dest: Path) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name, n = f"lmshard-{stamp}", 1
    while (dest / name).exists() or (dest / f".{name}.partial").exists():
        name, n = f"lmshard-{stamp}-{n}", n + 1
    return name


def _ready(ln: _ShardLink, values: list[Any]) -> None:
    txn_id, estimate, paused_us = values
    if ln.txn_id and txn_id != ln.txn_id:
        raise BackupError(f"shard {ln.shard} committed while paused: paused at txn {ln.txn_id}, "
                          f"snapshot at txn {txn_id}")
    ln.txn_id, ln.estimate = txn_id, estimate
    ln.paused_ms = paused_us / 1000 if ln.paused_ms is not None else None


def _paused(ln: _ShardLink, values: list[Any]) -> None:
    ln.txn_id, ln.paused_ms = values[0], 0.0


def _cut(links: list[_ShardLink], pause_timeout: float, barrier_timeout: float,
         chunk_size: int) -> float:
    """The two-phase barrier; the milliseconds from the first PAUSE to the last READY."""
    t0 = time.perf_counter()
    for ln in links:
        ln.send(PAUSE, int(pause_timeout * 1000))
    try:
        _collect(links, PAUSED, barrier_timeout, _paused)
    except BaseException:
        for ln in links:
            with contextlib.suppress(zmq.ZMQError):
                ln.send(RESUME)
        raise
    for ln in links:
        ln.send(SNAPSHOT, True, chunk_size)
    _collect(links, READY, barrier_timeout, _ready)
    return (time.perf_counter() - t0) * 1000


def _collect(links: list[_ShardLink], expect: Message, timeout: float,
             take: Callable[[_ShardLink, list[Any]], None]) -> None:
    """One ``expect`` answer from every link within ``timeout`` seconds."""
    poller = zmq.Poller()
    for ln in links:
        poller.register(ln.sock, zmq.POLLIN)
    waiting = {ln.sock: ln for ln in links}
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        events = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
        if not events and time.monotonic() >= deadline:
            shards = ", ".join(str(ln.shard) for ln in waiting.values())
            raise BackupError(
                f"shard(s) {shards} did not answer {expect.name} within {timeout:g} s",
                hint="is every owner running (`lmshard status`)? A paused owner resumes by "
                "itself; run the backup again")
        for sock in events:
            ln = waiting.pop(sock)
            poller.unregister(sock)
            m, values, _ = ln.recv()
            if m is not expect:
                raise ProtocolError(f"shard {ln.shard} answered {m.name}, expected {expect.name}")
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
        events = dict(poller.poll(100))
        for sock in events:
            ln = by_sock[sock]
            if sock is ln.monitor:
                event: Any = recv_monitor_message(ln.monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED and not ln.done:
                    raise BackupError(
                        f"shard {ln.shard}'s owner went away after {format_bytes(ln.size)} of "
                        f"~{format_bytes(ln.estimate)}: its copy is incomplete",
                        hint="check the owner's log (`lmshard status`), then back up again")
                continue
            while not ln.done and ln.sock.poll(0):
                m, values, data = ln.recv()
                if m is CHUNK:
                    _take_chunk(ln, values[0], data, pipeline)
                    progress.advance(ln.shard, len(data or b""))
                elif m is END:
                    _finish(ln, *values)
                    progress.done(ln.shard)
                else:
                    raise ProtocolError(f"shard {ln.shard} sent {m.name} while streaming")
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


def _manifest(config: Config, links: list[_ShardLink], out: Path, created: datetime.datetime,
              consistent: bool, barrier_ms: float | None) -> Manifest:
    from lmshard import __version__

    digest = config.slot_map.digest()
    schemas = set()
    shards = []
    for ln in links:
        assert ln.path is not None
        with _open_copy(ln.path) as env, env.begin() as txn:
            meta = _meta(env, txn)
        if meta.get(b"shard_id", str(ln.shard).encode()) != str(ln.shard).encode():
            raise BackupError(f"shard {ln.shard}'s data says it is shard "
                              f"{meta[b'shard_id'].decode()}")
        if meta.get(b"slot_map", digest.encode()) != digest.encode():
            raise BackupError(f"shard {ln.shard}'s data was written with another slot map than "
                              "the config's", hint="back up with the service's own config")
        schema = cbor2.loads(meta[b"schema"]) if b"schema" in meta else None
        schemas.add(json.dumps(schema, sort_keys=True))
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


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading a copy
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_copy(path: Path) -> Iterator[lmdb.Environment]:
    """A shard copy opened read-only, in place, without a lock file."""
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=MAX_DBS)
    except lmdb.Error as exc:
        raise BackupError(f"{path} is not a readable LMDB file: {exc}") from None
    try:
        yield env
    finally:
        env.close()


def _meta(env: lmdb.Environment, txn: lmdb.Transaction) -> dict[bytes, bytes]:
    try:
        db = env.open_db(META_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        return {}
    return {bytes(k): bytes(v) for k, v in txn.cursor(db=db).iternext()}


def _walk(env: lmdb.Environment, txn: lmdb.Transaction, schema: Schema | None
          ) -> tuple[dict[str, int], list[str]]:
    """Read every entry of every database, decode every row, check every index.

    Returns rows per table (or per database without a schema) and the problems found.
    """
    problems: list[str] = []
    main = env.open_db(None)
    entries: dict[str, int] = {}
    for key, rec in list(txn.cursor(db=main)):
        name = bytes(key)
        if len(rec) != _MDB_DB.size:
            continue
        flags = _MDB_DB.unpack(rec)[1]
        opts = {kw: True for bit, kw in _DB_FLAGS.items() if flags & bit}
        try:
            db = env.open_db(name, txn=txn, create=False, **opts)
            n = sum(1 for _ in txn.cursor(db=db).iternext())
        except lmdb.Error as exc:
            problems.append(f"database {name!r} cannot be read: {exc}")
            continue
        entries[name.decode(errors="replace")] = n
    if schema is None:
        return entries, problems
    from lmshard.testing import verify_indexes

    def open_db(dbname: bytes, dupsort: bool) -> Any:
        return env.open_db(dbname, txn=txn, dupsort=dupsort, create=False)

    try:
        tables = bind_tables(schema, open_db)
    except lmdb.NotFoundError as exc:
        return entries, [*problems, f"a table or index database of the schema is missing: {exc}"]
    rows: dict[str, int] = {}
    for t in schema.tables.values():
        b = tables[t]
        n = 0
        for kb, vb in txn.cursor(db=b.db).iternext():
            n += 1
            try:
                b.kdec(kb)
                b.loads(vb)
            except Exception as exc:
                problems.append(f"{t.name}: row 0x{kb.hex()[:64]} does not decode: {exc}")
                if len(problems) > 100:
                    return rows, problems
        rows[t.name] = n
    problems += verify_indexes(ReadTxn(txn, tables))
    return rows, problems


# --------------------------------------------------------------------------------------------
# Verifying a backup
# --------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    path: Path
    manifest: Manifest
    problems: list[str]
    notes: list[str]
    rows: dict[int, dict[str, int]]

    @property
    def ok(self) -> bool:
        return not self.problems


def hash_file(path: Path, *, shard: int = 0, progress: Progress | None = None,
              copy_to: IO[bytes] | None = None) -> tuple[int, str]:
    """``(size, SHA-256 hex)`` of a file, read in blocks; optionally copied to ``copy_to``."""
    progress = progress or _QUIET
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            sha.update(block)
            size += len(block)
            if copy_to is not None:
                copy_to.write(block)
            progress.advance(shard, len(block))
    return size, sha.hexdigest()


def verify_backup(src: str | os.PathLike[str], *, schema: Schema | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check a backup: every shard file present with its size and SHA-256, every copy opens
    read-only, every database reads to the end, every row decodes, every index matches its rows.

    Without ``schema`` the one the manifest names is imported (from its ``python_path``); when
    that fails the row and index checks are skipped and a note says so.
    """
    progress = progress or _QUIET
    path = find_backup(src)
    m = Manifest.load(path / MANIFEST_NAME)
    problems: list[str] = []
    notes: list[str] = []
    rows: dict[int, dict[str, int]] = {}
    if schema is None:
        schema, note = _import_schema(m)
        if note:
            notes.append(note)
    if schema is not None and schema.name != m.schema["name"]:
        problems.append(f"the backup holds schema {m.schema['name']!r}, the one given to check "
                        f"it with is {schema.name!r}")
        schema = None
    for sf in m.shards:
        f = path / sf.file
        if not f.is_file():
            problems.append(f"shard {sf.shard}: {sf.file} is missing")
            continue
        actual = f.stat().st_size
        if actual != sf.size:
            problems.append(f"shard {sf.shard}: {sf.file} has {actual:,} bytes, the manifest "
                            f"says {sf.size:,}")
            continue
        progress.begin(sf.shard, sf.size)
        _, sha = hash_file(f, shard=sf.shard, progress=progress)
        if sha != sf.sha256:
            problems.append(f"shard {sf.shard}: {sf.file} is damaged: its SHA-256 is {sha}, the "
                            f"manifest says {sf.sha256}")
            progress.failed(sf.shard, "checksum mismatch")
            continue
        try:
            with _open_copy(f) as env, env.begin() as txn:
                found = _check_meta(_meta(env, txn), sf.shard, m)
                counts, walked = _walk(env, txn, schema)
        except (BackupError, lmdb.Error) as exc:
            problems.append(f"shard {sf.shard}: {exc}")
            progress.failed(sf.shard, "unreadable")
            continue
        rows[sf.shard] = counts
        problems += [f"shard {sf.shard}: {p}" for p in found + walked]
        if found or walked:
            progress.failed(sf.shard, f"{len(found) + len(walked)} problem(s)")
        else:
            progress.done(sf.shard)
    return VerifyReport(path, m, problems, notes, rows)


def _check_meta(meta: dict[bytes, bytes], shard: int, m: Manifest) -> list[str]:
    out = []
    if meta.get(b"shard_id") not in (None, str(shard).encode()):
        out.append(f"the copy says it is shard {meta[b'shard_id'].decode()}")
    if meta.get(b"slot_map") not in (None, m.slot_map_digest.encode()):
        out.append("the copy was written with another slot map than the manifest's")
    if b"schema" in meta:
        s = cbor2.loads(meta[b"schema"])
        if (s["name"], s["version"]) != (m.schema["name"], m.schema.get("version")):
            out.append(f"the copy holds schema {s['name']!r} version {s['version']}, the "
                       f"manifest says {m.schema['name']!r} version {m.schema.get('version')}")
    return out


def _import_schema(m: Manifest) -> tuple[Schema | None, str]:
    ref = m.schema.get("ref")
    if not ref:
        return None, "the manifest names no schema module: rows and indexes were not checked"
    for p in m.schema.get("python_path", []):
        if p not in sys.path:
            sys.path.insert(0, p)
    module, _, attr = ref.partition(":")
    try:
        import importlib

        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        return None, (f"cannot import the schema {ref!r} ({type(exc).__name__}: {exc}): rows and "
                      "indexes were not checked; pass -c CONFIG to check them with its schema")
    if not isinstance(obj, Schema):
        return None, f"{ref!r} is not an lmshard Schema: rows and indexes were not checked"
    return obj, ""


# --------------------------------------------------------------------------------------------
# Restoring a backup
# --------------------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    path: Path
    manifest: Manifest
    data_dir: Path
    replaced: list[Path]
    notes: list[str]


def check_compatible(m: Manifest, config: Config, schema: Schema | None = None) -> list[str]:
    """BackupError when the backup cannot serve under ``config``; notes worth printing else."""
    digest = config.slot_map.digest()
    if m.slot_map_digest != digest or len(m.shards) != config.shards:
        theirs = m.slot_map
        raise BackupError(
            f"the backup's slot map ({theirs['shards']} shards, {theirs['slots']} slots, digest "
            f"{m.slot_map_digest[:12]}) is not the config's ({config.shards} shards, "
            f"{config.slots} slots, digest {digest[:12]}): every row lives on the shard its slot "
            "maps to, so under another slot map rows would be on the wrong shards",
            hint="restore with a config that has the backup's slot map (manifest.json holds it "
            "under slot_map); moving to a new slot map is a migration, not a restore")
    schema = schema if schema is not None else config.load_schema()
    name, version = m.schema["name"], m.schema.get("version")
    if name != schema.name:
        raise BackupError(
            f"the backup holds schema {name!r}, the config serves schema {schema.name!r}",
            hint="restore it under a config for its own service")
    notes = []
    if version is not None and version > schema.version:
        raise BackupError(
            f"the backup is at schema version {version}, newer than the config's schema "
            f"(version {schema.version}): the owners would refuse to open it",
            hint="deploy the code the backup was taken with first")
    if version is not None and version < schema.version:
        notes.append(f"the backup is at schema version {version}; the owners migrate it to "
                     f"version {schema.version} when they first open it")
    if m.store_format != FORMAT_VERSION:
        raise BackupError(f"the backup has store format {m.store_format}, this lmshard reads "
                          f"format {FORMAT_VERSION}")
    return notes


def service_running(config: Config) -> list[int]:
    """Shards whose owner answers on its endpoint right now."""
    up = []
    for n in range(config.shards):
        ep = config.endpoint(n)
        if ep.startswith("ipc://"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(ep[len("ipc://"):])
                except (ConnectionRefusedError, FileNotFoundError):
                    continue
                except OSError:
                    pass
            up.append(n)
        else:
            from lmshard.client import connect
            from lmshard.errors import ShardUnavailable

            with connect(config, timeout_ms=300, retries=0, local_reads=False) as c:
                try:
                    c.ping(n)
                    up.append(n)
                except ShardUnavailable:
                    pass
    return up


def restore_backup(src: str | os.PathLike[str], to: str | os.PathLike[str], config: Config, *,
                   force: bool = False, schema: Schema | None = None,
                   progress: Progress | None = None) -> RestoreResult:
    """Lay a backup's shard copies into the data dir ``to`` (``shard-NN/data.mdb``).

    Refuses a backup whose slot map or schema does not fit ``config``, a data dir that already
    holds shard data (unless ``force``), and the config's own data dir while its owners run.
    Every copy is checked against the manifest while it is copied; nothing is put in place
    unless all shards copied intact.
    """
    progress = progress or _QUIET
    path = find_backup(src)
    m = Manifest.load(path / MANIFEST_NAME)
    notes = check_compatible(m, config, schema)
    to = Path(to).absolute()
    if to.resolve() == config.data_dir.resolve():
        running = service_running(config)
        if running:
            raise BackupError(
                f"the service is running on {to} (shard(s) "
                f"{', '.join(map(str, running))} answer)",
                hint="stop it first (`lmshard down`), then restore")
    targets = [to / f"shard-{sf.shard:02d}" for sf in m.shards]
    existing = [t for t in targets if (t / "data.mdb").exists()]
    if existing and not force:
        raise BackupError(
            f"{to} already holds shard data ({', '.join(t.name for t in existing)}); restoring "
            "would overwrite it",
            hint="pass --force to replace it (that data is lost), or restore into an empty "
            "directory")
    tmps: list[Path] = []
    try:
        for sf, target in zip(m.shards, targets, strict=True):
            src_file = path / sf.file
            if not src_file.is_file():
                raise BackupError(f"shard {sf.shard}: {src_file} is missing",
                                  hint="this backup cannot be restored; use another one")
            target.mkdir(parents=True, exist_ok=True)
            tmp = target / "data.mdb.restoring"
            tmps.append(tmp)
            progress.begin(sf.shard, sf.size)
            with open(tmp, "wb") as out:
                size, sha = hash_file(src_file, shard=sf.shard, progress=progress,
                                      copy_to=out)
                out.flush()
                os.fsync(out.fileno())
            if (size, sha) != (sf.size, sf.sha256):
                progress.failed(sf.shard, "checksum mismatch")
                raise BackupError(f"shard {sf.shard}: {src_file} is damaged ({size:,} bytes, "
                                  f"SHA-256 {sha}; the manifest says {sf.size:,} bytes, "
                                  f"{sf.sha256})", hint="restore another backup")
            progress.done(sf.shard)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in zip(tmps, targets, strict=True):
        (target / "lock.mdb").unlink(missing_ok=True)  # its reader table describes the old file
        os.replace(tmp, target / "data.mdb")
        _fsync_dir(target)
    return RestoreResult(path, m, to, existing, notes)


def describe(m: Manifest) -> Iterable[str]:
    """Human lines about a backup, for the CLI."""
    kind = "consistent cut" if m.consistent else "per-shard snapshots (not one point in time)"
    yield f"taken {m.created}, {kind}, schema {m.schema['name']} v{m.schema.get('version')}"
    if m.pause_ms is not None:
        yield f"writes paused at most {m.pause_ms:.1f} ms (barrier {m.barrier_ms:.1f} ms)"
    for s in m.shards:
        yield f"  shard {s.shard:02d}  txn {s.txn_id:<10}  {format_bytes(s.size):>10}  {s.sha256}"
