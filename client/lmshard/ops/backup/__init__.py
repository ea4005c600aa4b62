"""Backups: a consistent cut across shards, streamed with credit, checked, restored.

Operator tooling, apart from the library: a service never imports it, and neither does the
daemon. The owner's side is ``lmshardd.backup``; both sides speak the messages declared in
``lmshard.backup_wire``. Each step has its module:

==================  ==========================================================================
``coordinator``     ``take_backup``: the barrier (retried), credit-paced streams, the manifest
``manifest``        a backup on disk: directory names, ``manifest.json``, finding and pruning
``copies``          a shard copy file: hashed, written durably, opened read-only
``verify``          ``verify_backup``: checksums, then every table and index of every copy
``restore``         ``restore_backup``: refuse what would not serve, copy checked, then rename
``progress``        ``Progress``: per-shard progress lines (the CLI prints them on stderr)
``errors``          ``BackupError``
==================  ==========================================================================

A backup is a directory ``DEST/lmshard-<UTC time>/`` holding ``shard-NN.mdb`` files and a
``manifest.json``; it is written as ``.lmshard-<time>.partial`` and renamed when complete.
The names below are the package's public face; ``lmshard backup``, ``verify`` and ``restore``
(``lmshard.ops.backup_cli``) use only them.
"""

from __future__ import annotations

from lmshard.errors import BackupError
from lmshard.ops.backup.coordinator import (
    BARRIER_TIMEOUT,
    CHUNK_SIZE,
    CUT_ATTEMPTS,
    PAUSE_TIMEOUT,
    PIPELINE,
    STALL_TIMEOUT,
    BackupResult,
    take_backup,
)
from lmshard.ops.backup.copies import hash_file
from lmshard.ops.backup.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardFile,
    find_backup,
    list_backups,
    prune,
    shard_file_name,
)
from lmshard.ops.backup.progress import Progress
from lmshard.ops.backup.restore import RestoreResult, check_compatible, restore_backup
from lmshard.ops.backup.verify import VerifyReport, verify_backup

__all__ = [
    "BARRIER_TIMEOUT", "CHUNK_SIZE", "CUT_ATTEMPTS", "MANIFEST_NAME", "PAUSE_TIMEOUT", "PIPELINE",
    "STALL_TIMEOUT", "BackupError", "BackupResult", "Manifest", "Progress", "RestoreResult",
    "ShardFile", "VerifyReport", "check_compatible", "find_backup", "hash_file",
    "list_backups", "prune", "restore_backup", "shard_file_name", "take_backup",
    "verify_backup",
]
