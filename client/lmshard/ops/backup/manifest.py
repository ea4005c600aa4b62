"""A backup on disk: ``DEST/lmshard-<UTC time>/`` with one ``shard-NN.mdb`` per shard and a
``manifest.json`` that records each file's size and SHA-256, the cut's txn ids, the slot map and
the schema. ``format_version`` guards the layout; this module is the one place that names the
files, finds backups in a DEST directory and prunes old ones.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmshard.errors import BackupError
from lmshard.routing import SlotMap
from lmshard.store_meta import FORMAT_VERSION

MANIFEST_FORMAT = "lmshard-backup"
MANIFEST_VERSION = 1
"""Bumped on any incompatible change of the manifest or the backup directory layout."""
MANIFEST_NAME = "manifest.json"

_BACKUP_DIR_RE = re.compile(r"lmshard-\d{8}T\d{6}(\.\d{6})?Z(-\d+)?")


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
        """Bytes of all shard files."""
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
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(f"{path} is not a valid backup manifest: {exc}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Manifest:
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
        return m


def shard_file_name(shard: int) -> str:
    """The name of ``shard``'s copy in a backup directory."""
    return f"shard-{shard:02d}.mdb"


def new_backup_name(dest: Path) -> str:
    """``lmshard-<UTC time>``, with a counter if ``dest`` holds that name already."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name, n = f"lmshard-{stamp}", 1
    while (dest / name).exists() or (dest / f".{name}.partial").exists():
        name, n = f"lmshard-{stamp}-{n}", n + 1
    return name


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


def check_keep(keep: int) -> None:
    """BackupError unless ``keep`` (backups to keep when pruning) is at least 1."""
    if keep < 1:
        raise BackupError(f"--keep {keep}: keep at least 1 backup")


def prune(dest: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete backups in ``dest``; the ones deleted."""
    check_keep(keep)
    old = list_backups(Path(dest))[:-keep]
    for p in old:
        shutil.rmtree(p)
    return old
