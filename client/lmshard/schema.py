"""Schemas, tables and indexes: the declarations both the embedded store and the daemon use.

A table is identified on disk by its UUID ``table_id``, never by its name, so renaming a table
in code keeps its data. Keys are encoded by the table's key kind (``lmshard.keys``), values by
its codec (``lmshard.codecs``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lmshard.codecs import Codec, get_codec
from lmshard.errors import SchemaError, TTLError, UnknownTable
from lmshard.keys import KeyCodec, key_codec

IndexFunction = Callable[[Any], Any]
Migration = Callable[[Any], None]

MAX_TTL = 100 * 365 * 86400
"""The longest time to live: 100 years, in seconds (an expiry must fit the row's header)."""


def ttl_seconds(ttl: Any, what: str) -> float:
    """``ttl`` as seconds to live: a finite number from 0 (exclusive) up to ``MAX_TTL``;
    TTLError naming ``what`` otherwise."""
    if type(ttl) not in (int, float) or not (0 < ttl <= MAX_TTL) or not math.isfinite(ttl):
        raise TTLError(
            f"{what}: ttl must be a number of seconds > 0 and <= {MAX_TTL:,}, not {ttl!r:.40}",
            hint="pass e.g. ttl=3600; to keep a row for good, persist() it",
        )
    return float(ttl)


class Index:
    """A secondary index: ``fn(value)`` gives the indexed value (a tuple for a composite index).

    Unique indexes map each indexed value to one row key; non-unique ones keep every row key
    (an LMDB dupsort database). With ``nullable=True`` rows whose indexed value is None are
    left out of the index; without it a None value is an error.
    """

    __slots__ = ("name", "table", "fn", "unique", "nullable", "db_name", "shard_key")

    def __init__(
        self, table: Table, name: str, fn: IndexFunction, *, unique: bool, nullable: bool
    ) -> None:
        self.name = name
        self.table = table
        self.fn = fn
        self.unique = unique
        self.nullable = nullable
        self.shard_key: Callable[[Any], Any] | None = None
        self.db_name = b"i/" + str(table.table_id).encode() + b"/" + name.encode()

    def __repr__(self) -> str:
        kind = "unique" if self.unique else "non-unique"
        return f"<Index {self.table.name}.{self.name} {kind}{' nullable' if self.nullable else ''}>"


def _table_ttl(name: str, ttl: Any, codec: Codec) -> float:
    """The ``ttl`` a table is declared with, checked: 0, or seconds as a put's ttl."""
    if ttl != 0 or type(ttl) not in (int, float):
        try:
            ttl = ttl_seconds(ttl, f"table {name!r}")
        except TTLError as exc:
            raise SchemaError(exc.message, hint="pass ttl=<seconds>, or ttl=0 for rows that "
                              "expire only when a put says so") from None
    if not getattr(codec, "carries_expiry", True):
        raise SchemaError(
            f"table {name!r}: codec {codec.name!r} cannot carry an expiry (its values are laid "
            "out from their first byte, and rows of a table with ttl start with their expiry)",
            hint="use another codec for a table with ttl, or drop ttl",
        )
    return float(ttl)


def _first(n: int) -> Callable[[Any], Any]:
    """The shard key of ``shard_key=n``: the key's first element, or its first n as a tuple."""
    if n == 1:
        def first(key: Any) -> Any:
            return key[0]
    else:
        def first(key: Any) -> Any:
            return tuple(key[:n])
    first.__doc__ = f"The first {n} element(s) of the key: the rows' shard key."
    return first


class Table:
    """A typed table: key kind, value codec, indexes, and how it is placed on shards.

    ``shard_key`` is a function of the key giving the part that decides the shard (rows with
    equal shard keys live together); ``pinned=True`` keeps the whole table on one shard.
    """

    def __init__(
        self,
        schema: Schema,
        name: str,
        table_id: uuid.UUID,
        key: KeyCodec,
        value: Codec,
        *,
        shard_key: Callable[[Any], Any] | None = None,
        pinned: bool = False,
        doc: str | None = None,
        ttl: float | None = None,
    ) -> None:
        self.schema = schema
        self.name = name
        self.table_id = table_id
        self.key = key
        self.value = value
        self.shard_key = shard_key
        self.shard_prefix: int | None = None
        """When the shard key is the key's first n elements (``shard_key=n``): n. A prefix scan
        naming at least those elements then reads one shard."""
        self.pinned = pinned
        self.doc = doc
        self.indexes: dict[str, Index] = {}
        self.db_name = b"t/" + str(table_id).encode()
        self.ttl = ttl
        """None: rows never expire and carry no expiry (the plain layout). Otherwise rows carry
        an expiry (``lmshard.bound_tables``) and this is the default time to live in seconds
        of a put that names none; 0: no default, only puts with ``ttl=`` expire."""
        self.expiry_db_name = b"x/" + str(table_id).encode()
        """The expiry index of a table with ``ttl``: expiry time + row key, in expiry order."""

    @property
    def placement(self) -> str:
        """How rows find their shard, as the shards record it (a change moves rows)."""
        if self.pinned:
            return "pinned"
        if self.shard_prefix is not None:
            return f"shard_key={self.shard_prefix}"
        return "shard_key function" if self.shard_key is not None else "key"

    def index(
        self,
        name: str,
        fn: IndexFunction,
        *,
        unique: bool = False,
        nullable: bool = False,
        shard_key: Callable[[Any], Any] | None = None,
    ) -> Index:
        """Declare a secondary index maintained in the same transaction as each row.

        On a table sharded by ``shard_key`` a unique index can only be enforced when equal index
        values always live on one shard: pass ``shard_key``, a function of the row value giving
        the same shard key as the table's ``shard_key(key)`` (it is checked on every write).
        """
        if not isinstance(name, str) or not name or "/" in name:
            raise SchemaError(
                f"index name {name!r} on table {self.name!r} is invalid",
                hint="use a non-empty name without '/'",
            )
        if name in self.indexes:
            raise SchemaError(
                f"table {self.name!r} already has an index named {name!r}",
                hint="give each index of a table its own name",
            )
        if not callable(fn):
            raise SchemaError(
                f"index {self.name}.{name}: the index function must be callable",
                hint="pass a function of the row value, e.g. lambda v: v['email']",
            )
        if shard_key is not None and (not callable(shard_key) or self.shard_key is None):
            raise SchemaError(
                f"index {self.name}.{name}: shard_key is a function of the row value, and only "
                "for a table declared with its own shard_key",
            )
        if unique and self.shard_key is not None and shard_key is None:
            raise SchemaError(
                f"unique index {self.name}.{name} on a table sharded by shard_key cannot be "
                "enforced: rows with one index value may live on different shards",
                hint="pass shard_key=<function of the value giving the row's shard key> so "
                "equal values share a shard, pin the table (pinned=True), or drop unique",
            )
        idx = Index(self, name, fn, unique=unique, nullable=nullable)
        idx.shard_key = shard_key
        self.indexes[name] = idx
        return idx

    @property
    def sharded(self) -> bool:
        """Whether rows spread over shards (not pinned to one)."""
        return not self.pinned

    def unenforceable_unique_indexes(self) -> list[Index]:
        """Unique indexes that one shard alone cannot enforce once rows spread over shards."""
        if self.pinned:
            return []
        return [ix for ix in self.indexes.values() if ix.unique and ix.shard_key is None]

    def __repr__(self) -> str:
        spec = f"key={self.key.spec!r} value={self.value.name}"
        return f"<Table {self.name} id={self.table_id} {spec}>"


class Schema:
    """A named set of tables with a version; migrations move stored data between versions."""

    def __init__(self, name: str, version: int = 1) -> None:
        if not isinstance(name, str) or not name:
            raise SchemaError(f"schema name {name!r} is invalid", hint="use a non-empty string")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SchemaError(f"schema version {version!r} is invalid", hint="use an int >= 1")
        self.name = name
        self.version = version
        self.tables: dict[str, Table] = {}
        self.by_id: dict[uuid.UUID, Table] = {}
        self.migrations: dict[int, Migration] = {}

    def table(
        self,
        name: str,
        *,
        table_id: str | uuid.UUID,
        key: str | Sequence[str] = "bytes",
        value: str | Codec = "cbor",
        shard_key: Callable[[Any], Any] | int | None = None,
        pinned: bool = False,
        doc: str | None = None,
        ttl: float | None = None,
    ) -> Table:
        """Declare a table. ``table_id`` is a UUID and is what names the table on disk.

        ``ttl``: rows expire. A number of seconds is the default time to live of every put
        (a put may pass its own ``ttl=``); ``ttl=0`` means rows expire only when a put passes
        ``ttl=``. Such a table stores an expiry with every row, so adding or removing ``ttl``
        later is refused (SchemaMismatch); changing its number is not.

        ``shard_key``: rows whose shard keys are equal live on one shard. Either a function of
        the key (its result is hashed), or, for a tuple key, an int n: the first n elements
        (fewer than all), hashed as they are encoded in the key. With an int, a scan or count
        whose prefix names those n elements reads one shard instead of every shard.
        """
        if not isinstance(name, str) or not name:
            raise SchemaError(f"table name {name!r} is invalid", hint="use a non-empty string")
        try:
            tid = table_id if isinstance(table_id, uuid.UUID) else uuid.UUID(str(table_id))
        except ValueError:
            raise SchemaError(
                f"table {name!r}: table_id {table_id!r} is not a UUID",
                hint="generate one with: python -c 'import uuid; print(uuid.uuid4())'",
            ) from None
        if name in self.tables:
            raise SchemaError(
                f"schema {self.name!r} already has a table named {name!r}",
                hint="each table needs its own name",
            )
        if tid in self.by_id:
            raise SchemaError(
                f"tables {self.by_id[tid].name!r} and {name!r} share the table_id {tid}",
                hint="each table needs its own UUID; the id names the table's data on disk",
            )
        if shard_key is not None and pinned:
            raise SchemaError(
                f"table {name!r} is both pinned and has a shard_key",
                hint="a pinned table lives on one shard; drop shard_key or pinned",
            )
        codec = key_codec(key if isinstance(key, str) else tuple(key))
        value_codec = get_codec(value)
        if ttl is not None:
            ttl = _table_ttl(name, ttl, value_codec)
        prefix_len: int | None = None
        if type(shard_key) is int:
            n = shard_key
            width = len(codec.spec) if isinstance(codec.spec, tuple) else 0
            if not 1 <= n < width:
                raise SchemaError(
                    f"table {name!r}: shard_key={n} names the first {n} key elements as the "
                    "shard key, which must leave at least one element out, but the "
                    + (f"key {codec.spec!r} has {width}" if width else
                       f"key is a single {codec.spec!r}, not a tuple"),
                    hint="use an int from 1 to one less than the number of key elements (to "
                    "spread rows by the whole key, leave shard_key out), or a function of the key",
                )
            prefix_len = n
            shard_key = _first(n)
        elif shard_key is not None and not callable(shard_key):
            raise SchemaError(
                f"table {name!r}: shard_key must be a function of the key or an int (how many "
                "leading elements of a tuple key decide the shard)")
        t = Table(
            self,
            name,
            tid,
            codec,
            value_codec,
            shard_key=shard_key,
            pinned=pinned,
            doc=doc,
            ttl=ttl,
        )
        t.shard_prefix = prefix_len
        self.tables[name] = t
        self.by_id[tid] = t
        return t

    def migration(self, from_version: int) -> Callable[[Migration], Migration]:
        """Register ``fn(txn)`` that moves stored data from ``from_version`` to the next one.

        The writer of a store (the embedded store, or each shard owner) runs the pending
        migrations at open, all in one write transaction.
        """
        if not isinstance(from_version, int) or not 1 <= from_version < self.version:
            raise SchemaError(
                f"migration from version {from_version!r} does not fit schema version "
                f"{self.version}",
                hint="register migrations from 1 .. version-1",
            )

        def register(fn: Migration) -> Migration:
            if from_version in self.migrations:
                raise SchemaError(f"a migration from version {from_version} is already set")
            self.migrations[from_version] = fn
            return fn

        return register

    def check_sharded(self, shards: int) -> None:
        """Refuse a schema whose unique indexes could be broken across ``shards`` shards."""
        if shards <= 1:
            return
        bad = [ix for t in self.tables.values() for ix in t.unenforceable_unique_indexes()]
        if bad:
            names = ", ".join(f"{ix.table.name}.{ix.name}" for ix in bad)
            raise SchemaError(
                f"unique index {names} cannot be enforced over {shards} shards: rows with one "
                "index value may land on different shards, and each shard checks only its own",
                hint="pin the table (pinned=True), or declare the table's shard_key and the "
                "index's shard_key so equal values share a shard, or drop unique",
            )

    def __getitem__(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise UnknownTable(
                f"schema {self.name!r} has no table {name!r}",
                hint=f"known tables: {', '.join(sorted(self.tables)) or '(none)'}",
            ) from None

    def __iter__(self) -> Iterator[Table]:
        return iter(self.tables.values())

    def __repr__(self) -> str:
        return f"<Schema {self.name} v{self.version} tables={list(self.tables)}>"
