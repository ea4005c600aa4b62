"""A check for the fault campaign: what a consistent backup of the running service holds.

``backup_restore_rows`` takes a consistent backup of a running service through the library
(``lmshard.ops.backup``), verifies it, restores it into a fresh data dir and reads every row of
every table from the restored shards, each opened read-only as an embedded store. The caller
compares the rows with what the service held at the cut: an acked batch is in the backup
exactly when its txn id on each shard it wrote is at most that shard's ``cut`` txn id.

It knows the service only by its config file, so it works for any schema.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmshard
from lmshard.config import Config, load_config
from lmshard.ops.backup import Progress, restore_backup, take_backup, verify_backup
from lmshard.schema import Schema

Row = tuple[str, Any]
"""``(table name, key)``; a key of several parts is a tuple."""


class BackupCheckFailed(AssertionError):
    """The backup was taken but is not what the service held: it did not verify, or a row is
    on more than one shard."""


@dataclass
class RestoredCut:
    """What a consistent backup holds, read back from its restore."""

    backup: Path
    """The backup directory (``out_dir/backups/lmshard-<time>``)."""
    data_dir: Path
    """Where it was restored (``out_dir/restored``, one ``shard-NN`` per shard)."""
    cut: dict[int, int]
    """Per shard, the txn id of the cut: the last transaction the backup holds."""
    rows: dict[Row, Any]
    """Every row of every table: ``(table, key) -> value``."""
    attempts: int
    """The attempt at the cut that succeeded (more than 1 when an owner answered late)."""


def backup_restore_rows(toml_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                        progress: Progress | None = None) -> RestoredCut:
    """Back up the service of ``toml_path`` (consistent cut), verify it, restore it into
    ``out_dir/restored`` and read every row back. ``out_dir`` is left with the backup and the
    restored copy for a look after a failure; the caller removes it.

    BackupError if no backup could be taken; BackupCheckFailed if it is not intact.
    """
    config = load_config(toml_path)
    schema = config.load_schema()
    out = Path(out_dir)
    result = take_backup(config, out / "backups", progress=progress)
    report = verify_backup(result.path, schema=schema)
    if not report.ok:
        raise BackupCheckFailed(f"backup {result.path} is not intact: "
                                + "; ".join(report.problems))
    # restore_backup checks the backup against the service's own config; the restored copy
    # is read through a copy of it whose data_dir is the fresh directory.
    restored = _restored_config(config, out / "restored")
    restore_backup(result.path, restored.data_dir, config, schema=schema)
    cut = {sf.shard: sf.txn_id for sf in result.manifest.shards}
    rows = _read_rows(restored, schema)
    return RestoredCut(result.path, restored.data_dir, cut, rows, result.cut_attempts)


def _restored_config(config: Config, data_dir: Path) -> Config:
    """``config`` with its data dir at ``data_dir``: the same shards, slot map and schema."""
    return dataclasses.replace(config, data_dir=data_dir.absolute())


def _read_rows(config: Config, schema: Schema) -> dict[Row, Any]:
    """Every row of every table of every shard under ``config.data_dir``;
    BackupCheckFailed if a row is on two shards."""
    rows: dict[Row, Any] = {}
    where: dict[Row, int] = {}
    for shard in range(config.shards):
        with lmshard.open(config.shard_dir(shard), schema, readonly=True) as store:
            for table in schema.tables:
                for key, value in store.scan(table):
                    row = (table, _hashable(key))
                    if row in where:
                        raise BackupCheckFailed(f"{table} row {key!r} is on shards "
                                                f"{where[row]} and {shard}")
                    rows[row], where[row] = value, shard
    return rows


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
