"""A shard's copy as a file: hashed while read or copied, written durably, opened read-only.

The coordinator writes copies and checks what each says about itself (its meta table); verify
and restore read them back. All of them go through here, so a copy is opened and hashed one way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import lmdb

from lmshard.errors import BackupError
from lmshard.ops.backup.progress import QUIET, Progress
from lmshard.store_meta import MAX_DBS

READ_BLOCK = 4 * 2**20
"""Bytes read at a time when hashing or copying a backup file: 4 MiB."""


def hash_file(path: Path, *, shard: int = 0, progress: Progress | None = None,
              copy_to: IO[bytes] | None = None) -> tuple[int, str]:
    """``(size, SHA-256 hex)`` of a file, read in blocks; optionally copied to ``copy_to``."""
    progress = progress or QUIET
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


@contextlib.contextmanager
def open_copy(path: Path) -> Iterator[lmdb.Environment]:
    """A shard copy opened read-only, in place, without a lock file."""
    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=MAX_DBS)
    except lmdb.Error as exc:
        raise BackupError(f"{path} is not a readable LMDB file: {exc}") from None
    try:
        yield env
    finally:
        env.close()


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
