"""lmshard's exceptions: one base class, each error says what to do about it.

Every error carries a numbered ``code`` so the wire protocol can send it and the client can raise
the same typed exception on the other side (see ``lmshard.protocol``). ``ERRORS`` is the table
of codes, declared here in one place whatever else was imported; docs/protocol.md lists it.
An error class elsewhere that declares no code of its own travels as its nearest ancestor here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Error(Exception):
    """Base class of every lmshard error."""

    code = 1
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        super().__init__(f"{message} ({self.hint})" if self.hint else message)

    def wire_fields(self) -> list[object]:
        """What this error carries on the wire after its message and hint (see
        ``error_from_wire``); none for most errors."""
        return []

    def take_wire_fields(self, fields: tuple[object, ...]) -> None:
        """Set what ``wire_fields`` sent (called on the receiving side)."""


class SchemaError(Error, ValueError):
    """A schema declaration is invalid (duplicate table id or name, bad key kind, ...)."""

    code = 10
    hint = "fix the schema declaration"


class UnknownTable(SchemaError):
    """A table name or table id is not in the schema."""

    code = 11
    hint = "declare the table in the schema, or check the name"


class UnknownIndex(SchemaError):
    """An index name is not declared on the table."""

    code = 12
    hint = "declare the index on the table, or check the name"


class SchemaMismatch(SchemaError):
    """The data on disk was written with an incompatible declaration of a table."""

    code = 13
    hint = "keep a table's key kind and codec, or give the changed table a new table_id"


class KeyEncodingError(Error, ValueError):
    """A key does not fit the table's declared key kind."""

    code = 20
    hint = "pass a key of the table's declared key kind"


class CodecError(Error, ValueError):
    """A value could not be encoded or decoded by the table's codec."""

    code = 21
    hint = "pass a value the table's codec can encode"


class NullIndexValue(KeyEncodingError):
    """An index function returned None for an index not declared nullable; nothing was written."""

    code = 22
    hint = "declare the index with nullable=True, or give the row a value for it"


class TTLError(Error, ValueError):
    """A time to live was refused: not a positive number of seconds, or given for a table
    declared without ``ttl`` (whose rows carry no expiry); nothing was written."""

    code = 23
    hint = "pass ttl as seconds > 0, to a table declared with schema.table(..., ttl=...)"


class UniqueViolation(Error):
    """A write would give a unique index two rows with one value; nothing was written."""

    code = 30
    hint = "another row already has this value; update or delete that row first"


class ConflictError(Error):
    """A compare-and-set found a different value than expected; nothing was written."""

    code = 31
    hint = "read the current value and retry"


class StoreFull(Error):
    """The store reached its map size cap (``max_map_size``); earlier data is intact."""

    code = 40
    hint = "raise max_map_size in the config, or delete data"


class ReadOnlyError(Error):
    """A write was attempted on a store opened read-only."""

    code = 41
    hint = "open the store writable, or send writes through the shard owner"


class TransactionError(Error):
    """A transaction was used after it ended, or in the wrong way."""

    code = 42
    hint = "use transactions as context managers and only inside their block"


class DiskFull(StoreFull):
    """The filesystem of the store is full (ENOSPC); nothing of the write was stored.

    Earlier data is intact and readable, and writes succeed again once there is room: each
    write is tried anew, with no restart. A StoreFull, so code that stops writing on a full
    store stops on a full disk too; unlike a map at its cap, it passes once space is freed.
    """

    code = 43
    hint = ("free space on the filesystem of data_dir (or grow it); writes succeed again "
            "by themselves once there is room, no restart needed")


class ConfigError(Error, ValueError):
    """The config file is missing, unreadable, not TOML, or has a bad key or value.

    ``key`` is the dotted key (``durability.sync``) or None; ``file`` the config file or None
    (config built by ``make_config``); ``line`` is set for TOML syntax errors.
    """

    code = 50
    hint = ""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        file: str | os.PathLike[str] | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.file = Path(file) if file is not None else None
        self.line = line
        self.detail = message
        prefix = ""
        if file is not None:
            prefix = f"{file}:{line}: " if line is not None else f"{file}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, hint=hint)


class ProtocolError(Error):
    """A frame could not be decoded or failed validation; nothing was applied."""

    code = 60
    hint = "send frames built by lmshard's client of the same protocol version"


class ShardUnavailable(Error):
    """A shard owner did not answer within the timeout, after every retry."""

    code = 61
    hint = "check that the shard owner runs (lmshard status) and its log"


class LimitExceeded(ProtocolError):
    """A frame, batch, key or value is over a configured limit; nothing was applied."""

    code = 62
    hint = "split the batch or the value"


class BatchPartiallyApplied(Error):
    """A batch spanning shards committed on some shards and failed on others.

    Each shard's part is atomic; ``committed`` maps shard -> txn id, ``failed`` maps
    shard -> the exception that shard's part raised.
    """

    code = 63
    hint = "inspect .committed and .failed; retry or compensate the failed parts"

    def __init__(self, message: str, *, committed: dict[int, int] | None = None,
                 failed: dict[int, Error] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.committed = committed or {}
        self.failed = failed or {}


class OutOfOrder(ProtocolError):
    """A pipelined batch reached the owner before the batch it follows was applied (that one was
    lost with a broken connection); nothing was applied."""

    code = 64
    hint = "resend the stream's unacknowledged batches, oldest first (lmshard's writer does)"


class DeadlineExceeded(ShardUnavailable):
    """A call's deadline (``Client.deadline``) passed before the shard answered. The message
    says whether anything was sent; a write that was sent may yet be applied, as after a
    timeout."""

    code = 66
    hint = "allow the call more time, or check the shard: lmshard status"


class NotPrimary(ShardUnavailable):
    """The process that answered holds a copy of the shard but does not own it now (a replica,
    or an owner that was failed over). ``primary`` names the member it believes owns the shard
    (None when it does not know) and ``epoch`` that owner's epoch. Nothing was applied; the
    client library follows the answer by itself and raises this only when it cannot."""

    code = 90
    hint = "check which copy owns the shard: lmshard status (after a failover, every client " \
           "finds the new owner by itself)"

    def __init__(self, message: str, *, primary: str | None = None, epoch: int = 0,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.primary = primary
        self.epoch = epoch

    def wire_fields(self) -> list[object]:
        return [self.primary, self.epoch]

    def take_wire_fields(self, fields: tuple[object, ...]) -> None:
        primary, epoch = (*fields, None, 0)[:2]
        self.primary = primary if isinstance(primary, str) else None
        self.epoch = epoch if type(epoch) is int else 0


class ReplicaTimeout(Error):
    """A write was committed on the shard's owner but fewer than ``durability.replicas``
    replicas confirmed it within ``durability.replica_timeout``. It is durable on the owner's
    host only: if that host is lost before a replica has it, it is lost. Resending the same
    batch (the client does, with the same sequence number) applies nothing again and waits
    for the replicas once more."""

    code = 91
    hint = "check the replicas (lmshard status): they must run and follow the owner"


class ReplicaBehind(Error):
    """A read on this host's replica could not see this client's own write (its ack's txn id)
    within ``client.replica_wait``: the replica is behind the owner, or stopped following."""

    code = 92
    hint = "check the replica's lag (lmshard status), or read through the owner"


class SlotMoved(Error):
    """A request routed by an older slot map reached a shard that no longer owns (some of) its
    keys: a re-shard moved their slots (``lmshard reshard``). ``version`` and ``map`` are the
    shard's slot map (``SlotMap.to_dict()``). Nothing was applied; the client library adopts
    the map and sends the request where its keys live now, and raises this only when it
    cannot."""

    code = 93
    hint = "the client library follows moved slots by itself; check lmshard reshard --status"

    def __init__(self, message: str, *, version: int = 0, map: dict[str, Any] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.version = version
        self.map = map

    def wire_fields(self) -> list[object]:
        return [self.version, self.map]

    def take_wire_fields(self, fields: tuple[object, ...]) -> None:
        version, m = (*fields, 0, None)[:2]
        self.version = version if type(version) is int else 0
        self.map = m if isinstance(m, dict) else None


class SlotsMoving(Error):
    """A write touched slots whose move to another shard is switching over (writes to them wait
    a few milliseconds). Nothing was applied; the client library waits and sends it again, and
    raises this only past its timeout."""

    code = 94
    hint = "a re-shard is switching these slots (lmshard reshard --status); send it again"


class BatchesFailed(Error):
    """Batches a pipelined writer sent were refused by their shards; every other batch of the
    stream was applied.

    ``failed`` lists (shard, number of ops, the exception that shard raised) per refused batch,
    in the order they were sent; ``committed`` counts the batches applied.
    """

    code = 65
    hint = "inspect .failed: each refused batch was applied not at all, the others fully"

    def __init__(self, message: str, *, failed: list[tuple[int, int, Error]] | None = None,
                 committed: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.failed = failed or []
        self.committed = committed


class BackupError(Error):
    """A backup, verify or restore could not be done; the message says which shard and why."""

    code = 70
    hint = "nothing was changed; fix the cause and run the command again"


class ChangesCompacted(Error):
    """A watch asked for changes the shard's log no longer holds: older than its retention, or
    from before the log was started anew (a restore, or the log switched off and on).

    ``oldest`` is the oldest cursor still available (resume there, knowing changes between were
    missed, or rebuild from a full read); ``shard`` the shard whose log is past it.
    """

    code = 80
    hint = ("resume from .oldest after rebuilding what the missed changes fed, or keep the log "
            "longer ([changes] retain and retain_seconds)")

    def __init__(self, message: str, *, oldest: str | None = None, shard: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.oldest = oldest
        self.shard = shard


class InvalidCursor(Error, ValueError):
    """A change-feed cursor that is not one a watch gave out (or is for another config)."""

    code = 81
    hint = ('pass a Watch.cursor you stored, "now" or "start"')


class InternalError(Error):
    """The shard owner hit an unexpected error; the batch was not applied."""

    code = 99
    hint = "see the shard owner's log"


ERRORS: tuple[type[Error], ...] = (
    Error,
    SchemaError, UnknownTable, UnknownIndex, SchemaMismatch,          # 1x the schema
    KeyEncodingError, CodecError, NullIndexValue, TTLError,            # 2x keys and values
    UniqueViolation, ConflictError,                                    # 3x a write's conditions
    StoreFull, ReadOnlyError, TransactionError, DiskFull,              # 4x the store
    ConfigError,                                                       # 5x the config
    ProtocolError, ShardUnavailable, LimitExceeded, BatchPartiallyApplied, OutOfOrder,
    BatchesFailed, DeadlineExceeded,                                   # 6x the wire
    BackupError,                                                       # 7x backup and restore
    ChangesCompacted, InvalidCursor,                                   # 8x the change feed
    NotPrimary, ReplicaTimeout, ReplicaBehind, SlotMoved, SlotsMoving,  # 9x copies, slots
    InternalError,
)
"""Every error class with its wire code, in code order: the table both sides share."""


def _by_code(classes: tuple[type[Error], ...]) -> dict[int, type[Error]]:
    table: dict[int, type[Error]] = {}
    for cls in classes:
        if cls.code in table:
            raise AssertionError(f"{cls.__name__} and {table[cls.code].__name__} share code "
                                 f"{cls.code}")
        table[cls.code] = cls
    return table


_BY_CODE = _by_code(ERRORS)


def error_classes() -> dict[int, type[Error]]:
    """Every error class by its wire code (``ERRORS`` as a mapping)."""
    return dict(_BY_CODE)


MAX_WIRE_FIELDS = 4
"""Most fields an error carries after its message and hint (``Error.wire_fields``)."""


def error_from_wire(code: int, message: str, hint: str | None, *fields: object) -> Error:
    """Rebuild the typed exception a peer sent (``Error`` for a code this side does not know),
    with the ``wire_fields`` it carries after its message and hint."""
    if len(fields) > MAX_WIRE_FIELDS or not isinstance(message, str):
        raise TypeError("an error's body is [message, hint] and at most "
                        f"{MAX_WIRE_FIELDS} fields more")
    cls = _BY_CODE.get(code, Error)
    err = cls.__new__(cls)
    Error.__init__(err, message, hint=hint)
    err.take_wire_fields(fields)
    return err
