"""Verifying a backup: every shard file against the manifest, then every copy read to the end.

Checksums alone trust whatever was copied, so verify also opens each copy read-only, reads
every database, decodes every row and checks every index against its rows (with the schema the
manifest names, or one given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import lmdb

from lmshard.bound_tables import bind_tables
from lmshard.config.schema_import import import_schema
from lmshard.errors import BackupError, ConfigError
from lmshard.index_check import verify_indexes
from lmshard.named_dbs import named_dbs
from lmshard.ops.backup.copies import hash_file, open_copy
from lmshard.ops.backup.manifest import MANIFEST_NAME, Manifest, ShardFile, find_backup
from lmshard.ops.backup.progress import QUIET, Progress
from lmshard.schema import Schema
from lmshard.store_meta import meta_records
from lmshard.txn import ReadTxn

MAX_ROW_PROBLEMS = 100
"""Undecodable rows reported before the walk of a copy stops: past that, more detail does not
help."""


@dataclass
class VerifyReport:
    """What verify found: ``problems`` (none means intact), ``notes`` on what was not checked,
    and rows per table (or entries per database without a schema) of each shard."""

    path: Path
    manifest: Manifest
    problems: list[str]
    notes: list[str]
    rows: dict[int, dict[str, int]]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_backup(src: str | os.PathLike[str], *, schema: Schema | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check a backup: every shard file present with its size and SHA-256, every copy opens
    read-only, every database reads to the end, every row decodes, every index matches its rows.

    Without ``schema`` the one the manifest names is imported (from its ``python_path``); when
    that fails the row and index checks are skipped and a note says so.
    """
    progress = progress or QUIET
    path = find_backup(src)
    m = Manifest.load(path / MANIFEST_NAME)
    report = VerifyReport(path, m, [], [], {})
    if schema is None:
        schema, note = _import_schema(m)
        if note:
            report.notes.append(note)
    if schema is not None and schema.name != m.schema["name"]:
        report.problems.append(f"the backup holds schema {m.schema['name']!r}, the one given to "
                               f"check it with is {schema.name!r}")
        schema = None
    for sf in m.shards:
        _verify_shard(report, sf, schema, progress)
    return report


def _verify_shard(report: VerifyReport, sf: ShardFile, schema: Schema | None,
                  progress: Progress) -> None:
    """Check one shard's file and copy; what is wrong goes into ``report``."""
    f = report.path / sf.file
    if not f.is_file():
        report.problems.append(f"shard {sf.shard}: {sf.file} is missing")
        return
    actual = f.stat().st_size
    if actual != sf.size:
        report.problems.append(f"shard {sf.shard}: {sf.file} has {actual:,} bytes, the "
                               f"manifest says {sf.size:,}")
        return
    progress.begin(sf.shard, sf.size)
    _, sha = hash_file(f, shard=sf.shard, progress=progress)
    if sha != sf.sha256:
        report.problems.append(f"shard {sf.shard}: {sf.file} is damaged: its SHA-256 is {sha}, "
                               f"the manifest says {sf.sha256}")
        progress.failed(sf.shard, "checksum mismatch")
        return
    try:
        with open_copy(f) as env, env.begin() as txn:
            found = _check_meta(meta_records(env, txn), sf.shard, report.manifest)
            counts, walked = _walk(env, txn, schema)
    except (BackupError, lmdb.Error) as exc:
        report.problems.append(f"shard {sf.shard}: {exc}")
        progress.failed(sf.shard, "unreadable")
        return
    report.rows[sf.shard] = counts
    report.problems += [f"shard {sf.shard}: {p}" for p in found + walked]
    if found or walked:
        progress.failed(sf.shard, f"{len(found) + len(walked)} problem(s)")
    else:
        progress.done(sf.shard)


def _check_meta(meta: dict[bytes, bytes], shard: int, m: Manifest) -> list[str]:
    """What the copy's meta table says that disagrees with the manifest."""
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


def _walk(env: lmdb.Environment, txn: lmdb.Transaction, schema: Schema | None
          ) -> tuple[dict[str, int], list[str]]:
    """Read every entry of every database, decode every row, check every index.

    Returns rows per table (or entries per database without a schema) and the problems found.
    """
    entries, problems = _read_databases(env, txn)
    if schema is None:
        return entries, problems

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
                if len(problems) > MAX_ROW_PROBLEMS:
                    return rows, problems
        rows[t.name] = n
    problems += verify_indexes(ReadTxn(txn, tables))
    return rows, problems


def _read_databases(env: lmdb.Environment, txn: lmdb.Transaction
                    ) -> tuple[dict[str, int], list[str]]:
    """Entries of every named database, each read to the end; the ones that cannot be read."""
    problems: list[str] = []
    entries: dict[str, int] = {}
    for named in named_dbs(txn, env.open_db(None)):
        try:
            db = env.open_db(named.name, txn=txn, create=False, **named.open_flags)
            n = sum(1 for _ in txn.cursor(db=db).iternext())
        except lmdb.Error as exc:
            problems.append(f"database {named.name!r} cannot be read: {exc}")
            continue
        entries[named.name.decode(errors="replace")] = n
    return entries, problems


def _import_schema(m: Manifest) -> tuple[Schema | None, str]:
    """The schema the manifest names, imported from its ``python_path``; or None and why not."""
    ref = m.schema.get("ref")
    if not ref:
        return None, "the manifest names no schema module: rows and indexes were not checked"
    try:
        obj = import_schema(ref, [Path(p) for p in m.schema.get("python_path", [])], None)
    except ConfigError as exc:
        return None, (f"cannot import the schema {ref!r} ({exc.detail}): rows and indexes "
                      "were not checked; pass -c CONFIG to check them with its schema")
    if not isinstance(obj, Schema):
        return None, f"{ref!r} is not an lmshard Schema: rows and indexes were not checked"
    return obj, ""
