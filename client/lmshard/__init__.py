"""lmshard: a typed, indexed table layer over LMDB, embedded or sharded behind a daemon.

    schema = lmshard.Schema("app")
    users = schema.table("users", table_id="...", key="uuid", value="cbor")
    with lmshard.open("./data", schema) as store:
        store.put(users, uid, {"email": "a@example.com"})
"""

from __future__ import annotations

from lmshard.api import DataAPI
from lmshard.batch import Batch
from lmshard.client import Client, connect
from lmshard.codecs import Codec, flatbuffers_codec, get_codec, register_codec
from lmshard.errors import (
    BatchesFailed,
    BatchPartiallyApplied,
    ChangesCompacted,
    CodecError,
    ConflictError,
    DeadlineExceeded,
    DiskFull,
    Error,
    InvalidCursor,
    KeyEncodingError,
    NotPrimary,
    NullIndexValue,
    OutOfOrder,
    ProtocolError,
    ReadOnlyError,
    ReplicaBehind,
    ReplicaTimeout,
    SchemaError,
    SchemaMismatch,
    ShardUnavailable,
    SlotMoved,
    SlotsMoving,
    StoreFull,
    TransactionError,
    TTLError,
    UniqueViolation,
    UnknownIndex,
    UnknownTable,
)
from lmshard.schema import Index, Schema, Table
from lmshard.store import Store, open
from lmshard.txn import ReadTxn, WriteTxn, value_hash
from lmshard.watch import Change, Watch
from lmshard.writer import Writer

__version__ = "0.1.0"

__all__ = [
    "Batch", "BatchesFailed", "DataAPI", "BatchPartiallyApplied", "Client", "OutOfOrder", "Writer",
    "ProtocolError", "ShardUnavailable", "connect",
    "Codec", "CodecError", "ConflictError", "DiskFull", "Error", "Index", "KeyEncodingError",
    "NullIndexValue", "ReadOnlyError", "ReadTxn", "Schema", "SchemaError", "SchemaMismatch",
    "Store", "StoreFull", "Table", "TransactionError", "UniqueViolation", "UnknownIndex",
    "UnknownTable", "WriteTxn", "flatbuffers_codec", "get_codec", "open", "register_codec",
    "value_hash", "DeadlineExceeded", "Change", "ChangesCompacted", "InvalidCursor", "Watch",
    "TTLError", "NotPrimary", "ReplicaTimeout", "ReplicaBehind",
    "SlotMoved", "SlotsMoving",
]
