"""What a store records about itself, and bringing it up to date when it is opened.

Each environment has a meta database (``META_DB``) holding the store format, the schema's name
and version, and one record per table: its name, key kinds, codec, placement and indexes.
Opening a store for writing checks these records against the code's schema (a store is never
silently read with other key or value types), builds indexes that are new or changed, drops
indexes no longer declared, runs the schema's migrations up to its version, and writes the
records back, all in the store's first write transaction.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cbor2
import lmdb

from lmshard.errors import SchemaError, SchemaMismatch, UniqueViolation
from lmshard.schema import Schema, Table
from lmshard.txn import WriteTxn

log = logging.getLogger("lmshard.store")

MAX_DBS = 256
"""Named databases per environment (tables + indexes + meta); the same in every process."""
META_DB = b"__lmshard__"
"""The named database of these records, beside the tables' and indexes' databases."""
FORMAT_VERSION = 1
"""The layout of a store's databases; a store of another format is refused."""


def read_meta(path: str | os.PathLike[str]) -> dict[bytes, bytes] | None:
    """The records a store at ``path`` keeps about itself (format, schema, tables), read
    without changing anything; None if there is no store there yet."""
    if not Path(path, "data.mdb").is_file():
        return None
    env = lmdb.open(os.fspath(path), readonly=True, lock=False, max_dbs=MAX_DBS, subdir=True)
    try:
        with env.begin() as txn:
            return meta_records(env, txn)
    finally:
        env.close()


def meta_records(env: lmdb.Environment, txn: lmdb.Transaction) -> dict[bytes, bytes]:
    """The meta records of the environment ``env`` as ``txn`` sees them; empty if it has
    none."""
    try:
        db = env.open_db(META_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        return {}
    return {bytes(k): bytes(v) for k, v in txn.cursor(db=db).iternext()}


def check_stored_schema(schema: Schema, meta: dict[bytes, bytes], path: Any) -> int:
    """Refuse a store whose records (``read_meta``) conflict with ``schema``: another format or
    schema name, a newer schema version, a table created with other key or value types. The
    stored schema version (``schema.version`` for a new store)."""
    fmt = meta.get(b"format")
    if fmt is not None and int(fmt) != FORMAT_VERSION:
        raise SchemaMismatch(
            f"the store at {path} has format {fmt.decode()}, this lmshard reads "
            f"format {FORMAT_VERSION}"
        )
    stored = cbor2.loads(meta[b"schema"]) if b"schema" in meta else None
    if stored is not None and stored["name"] != schema.name:
        raise SchemaMismatch(
            f"the store at {path} belongs to schema {stored['name']!r}, not {schema.name!r}",
            hint="open it with its own schema, or use another path",
        )
    version: int = stored["version"] if stored else schema.version
    if version > schema.version:
        raise SchemaMismatch(
            f"the store at {path} is at schema version {version}, newer than this "
            f"code's version {schema.version}",
            hint="run the newer code, or restore a backup taken before the upgrade",
        )
    for t in schema.tables.values():
        mkey = b"table/" + str(t.table_id).encode()
        if mkey not in meta:
            continue
        record = cbor2.loads(meta[mkey])
        declared = {"key": stored_spec(t.key.spec), "value": t.value.name}
        for what in ("key", "value"):
            if record[what] != declared[what]:
                raise SchemaMismatch(
                    f"table {t.name!r} ({t.table_id}) was created with {what} "
                    f"{record[what]!r}, the schema now declares {declared[what]!r}"
                )
        if record.get("expires", False) != (t.ttl is not None):
            # rows of a table with ttl start with their expiry: the stored layout differs
            raise SchemaMismatch(
                f"table {t.name!r} ({t.table_id}) was created "
                + ("with ttl, the schema now declares none" if record.get("expires") else
                   "without ttl, the schema now declares ttl")
                + ": its rows are stored " + ("with" if record.get("expires") else "without")
                + " an expiry",
                hint="keep the table's ttl declared as it was (its number may change), or "
                "declare a new table (a new table_id) and copy the rows over",
            )
    return version


def record_schema(
    w: WriteTxn, env: lmdb.Environment, meta_db: Any, meta: dict[bytes, bytes], schema: Schema,
    path: str,
) -> None:
    """Check ``meta`` (the records as they were) against ``schema``, build and drop indexes,
    run migrations and write the records, inside the write transaction ``w`` on ``env``."""
    version = check_stored_schema(schema, meta, path)
    txn = w.txn
    for t in schema.tables.values():
        _update_indexes(w, env, t, meta)
        txn.put(_table_key(t), cbor2.dumps(_table_record(t)), db=meta_db)
    for v in range(version, schema.version):
        migrate = schema.migrations.get(v)
        if migrate is None:
            raise SchemaError(
                f"no migration from schema version {v} to {v + 1}",
                hint=f"declare one with @schema.migration({v})",
            )
        log.info("migrating %s from schema version %d to %d", path, v, v + 1)
        migrate(w)
    txn.put(b"format", str(FORMAT_VERSION).encode(), db=meta_db)
    txn.put(
        b"schema", cbor2.dumps({"name": schema.name, "version": schema.version}), db=meta_db
    )


def _update_indexes(w: WriteTxn, env: lmdb.Environment, t: Table, meta: dict[bytes, bytes]) -> None:
    """Build the indexes of ``t`` whose record differs (new, or other flags); drop those gone."""
    mkey = _table_key(t)
    record = cbor2.loads(meta[mkey]) if mkey in meta else None
    built = record.get("indexes", {}) if record else {}
    for ix in t.indexes.values():
        flags = {"unique": ix.unique, "nullable": ix.nullable}
        if built.get(ix.name) != flags:
            build_index(w, t.name, ix.name)
    txn = w.txn
    for gone in set(built) - set(t.indexes):
        log.warning("index %s.%s is no longer declared: dropping it", t.name, gone)
        name = b"i/" + str(t.table_id).encode() + b"/" + gone.encode()
        txn.drop(env.open_db(name, txn=txn, dupsort=not built[gone]["unique"]))


def build_index(w: WriteTxn, table: str, index: str) -> None:
    """(Re)build one index from the table's rows; UniqueViolation if a unique index cannot hold
    them."""
    b = w.tables[table]
    bi = b.index(index)
    txn = w.txn
    txn.drop(bi.db, delete=False)
    rows = int(txn.stat(b.db)["entries"])
    if rows:
        log.info("building index %s.%s over %d rows", table, index, rows)
    for kb, vb in w.scan_raw(table):
        value = b.loads(vb)
        ivb = bi.encode(value)
        if ivb is None:
            continue
        if bi.unique:
            if not txn.put(ivb, kb, db=bi.db, overwrite=False):
                raise UniqueViolation(
                    f"cannot build unique index {table}.{index}: two rows share a value"
                )
        else:
            txn.put(ivb, kb, db=bi.db)


def _table_key(t: Table) -> bytes:
    return b"table/" + str(t.table_id).encode()


def _table_record(t: Table) -> dict[str, Any]:
    """What the meta database keeps about a table."""
    return {
        "key": stored_spec(t.key.spec), "value": t.value.name, "name": t.name,
        "placement": t.placement,
        "indexes": {
            ix.name: {"unique": ix.unique, "nullable": ix.nullable} for ix in t.indexes.values()
        },
        **({"expires": True} if t.ttl is not None else {}),
    }


def stored_spec(spec: Any) -> Any:
    """A key kind spec as the records keep it (a tuple of kinds becomes a list, as CBOR has)."""
    return list(spec) if isinstance(spec, tuple) else spec
