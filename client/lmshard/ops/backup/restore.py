"""Restoring a backup: its shard copies laid into a data dir as ``shard-NN/data.mdb``.

A restore refuses what would not serve: a backup whose slot map, shard count or schema does not
fit the config, a data dir that already holds shard data (unless forced), and the config's own
data dir while its owners run. Every copy is checked against the manifest while it is copied,
and nothing is put in place unless all shards copied intact.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from lmshard.client import connect
from lmshard.config import Config
from lmshard.errors import BackupError, ShardUnavailable
from lmshard.ops.backup.copies import fsync_dir, hash_file
from lmshard.ops.backup.manifest import MANIFEST_NAME, Manifest, ShardFile, find_backup
from lmshard.ops.backup.progress import QUIET, Progress
from lmshard.schema import Schema
from lmshard.store_meta import FORMAT_VERSION

RESTORING = "data.mdb.restoring"
"""The name a shard's copy has in its directory until every shard copied intact."""


@dataclass
class RestoreResult:
    """A restore done: the backup, the data dir it went to, shard dirs whose data it replaced,
    and notes worth printing."""

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
    return [n for n in range(config.shards) if _owner_answers(config, n)]


def _owner_answers(config: Config, shard: int) -> bool:
    ep = config.endpoint(shard)
    if ep.startswith("ipc://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(ep[len("ipc://"):])
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            except OSError:
                pass
        return True
    with connect(config, timeout_ms=300, retries=0, local_reads=False) as c:
        try:
            c.ping(shard)
        except ShardUnavailable:
            return False
        return True


def restore_backup(src: str | os.PathLike[str], to: str | os.PathLike[str], config: Config, *,
                   force: bool = False, schema: Schema | None = None,
                   progress: Progress | None = None) -> RestoreResult:
    """Lay a backup's shard copies into the data dir ``to`` (``shard-NN/data.mdb``).

    Refuses a backup whose slot map or schema does not fit ``config``, a data dir that already
    holds shard data (unless ``force``), and the config's own data dir while its owners run.
    Every copy is checked against the manifest while it is copied; nothing is put in place
    unless all shards copied intact.
    """
    progress = progress or QUIET
    path = find_backup(src)
    m = Manifest.load(path / MANIFEST_NAME)
    notes = check_compatible(m, config, schema)
    to = Path(to).absolute()
    targets = [to / f"shard-{sf.shard:02d}" for sf in m.shards]
    existing = _refuse_overwrite(to, targets, config, force)
    tmps: list[Path] = []
    try:
        for sf, target in zip(m.shards, targets, strict=True):
            tmps.append(_copy_checked(path / sf.file, sf, target, progress))
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in zip(tmps, targets, strict=True):
        (target / "lock.mdb").unlink(missing_ok=True)  # its reader table describes the old file
        os.replace(tmp, target / "data.mdb")
        fsync_dir(target)
    return RestoreResult(path, m, to, existing, notes)


def _refuse_overwrite(to: Path, targets: list[Path], config: Config, force: bool) -> list[Path]:
    """The shard dirs in ``to`` that hold data already; BackupError if the service runs on
    ``to``, or if some hold data and ``force`` is not given."""
    if to.resolve() == config.data_dir.resolve():
        running = service_running(config)
        if running:
            raise BackupError(
                f"the service is running on {to} (shard(s) "
                f"{', '.join(map(str, running))} answer)",
                hint="stop it first (`lmshard down`), then restore")
    existing = [t for t in targets if (t / "data.mdb").exists()]
    if existing and not force:
        raise BackupError(
            f"{to} already holds shard data ({', '.join(t.name for t in existing)}); restoring "
            "would overwrite it",
            hint="pass --force to replace it (that data is lost), or restore into an empty "
            "directory")
    return existing


def _copy_checked(src_file: Path, sf: ShardFile, target: Path, progress: Progress) -> Path:
    """Copy one shard's file into ``target`` under a temporary name, durably; that name.
    BackupError (and nothing left behind) unless the copy matches the manifest."""
    if not src_file.is_file():
        raise BackupError(f"shard {sf.shard}: {src_file} is missing",
                          hint="this backup cannot be restored; use another one")
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / RESTORING
    try:
        progress.begin(sf.shard, sf.size)
        with open(tmp, "wb") as out:
            size, sha = hash_file(src_file, shard=sf.shard, progress=progress, copy_to=out)
            out.flush()
            os.fsync(out.fileno())
        if (size, sha) != (sf.size, sf.sha256):
            progress.failed(sf.shard, "checksum mismatch")
            raise BackupError(f"shard {sf.shard}: {src_file} is damaged ({size:,} bytes, "
                              f"SHA-256 {sha}; the manifest says {sf.size:,} bytes, "
                              f"{sf.sha256})", hint="restore another backup")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    progress.done(sf.shard)
    return tmp
