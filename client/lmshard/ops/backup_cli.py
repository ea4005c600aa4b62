"""``lmshard backup``, ``lmshard verify``, ``lmshard restore`` (see docs/backup.md).

    lmshard backup DEST [--consistent/--no-consistent] [--keep N] [-c CONFIG] [-q]
    lmshard verify DEST [-c CONFIG] [-q]
    lmshard restore SRC --to DIR [--force] [-c CONFIG] [-q]

Progress goes to stderr, the result to stdout. Exit status: 0 ok, 1 failed (or verify found a
problem), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from lmshard.config import ENV_VAR, load_config
from lmshard.ops import backup
from lmshard.units import format_bytes

EXIT_FAILED = 1


def _progress(verb: str, args: argparse.Namespace) -> backup.Progress:
    return backup.Progress(verb, sys.stderr, quiet=args.quiet)


def describe(m: backup.Manifest) -> Iterator[str]:
    """Lines about a backup for a person: when, what kind of cut, each shard's file."""
    kind = "consistent cut" if m.consistent else "per-shard snapshots (not one point in time)"
    yield f"taken {m.created}, {kind}, schema {m.schema['name']} v{m.schema.get('version')}"
    if m.pause_ms is not None:
        yield f"writes paused at most {m.pause_ms:.1f} ms (barrier {m.barrier_ms:.1f} ms)"
    for s in m.shards:
        yield f"  shard {s.shard:02d}  txn {s.txn_id:<10}  {format_bytes(s.size):>10}  {s.sha256}"


def cmd_backup(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    result = backup.take_backup(config, args.dest, consistent=args.consistent, keep=args.keep,
                                progress=_progress("backup", args))
    m = result.manifest
    print(f"backup {result.path}: {len(m.shards)} shards, {format_bytes(m.size)} in "
          f"{m.seconds:.1f} s")
    for line in describe(m):
        print(line)
    for p in result.pruned:
        print(f"removed old backup {p} (--keep {args.keep})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    schema = load_config(args.config).load_schema() if args.config else None
    report = backup.verify_backup(args.dest, schema=schema, progress=_progress("verify", args))
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        print(f"backup {report.path} is NOT intact: {len(report.problems)} problem(s)")
        for p in report.problems:
            print(f"  {p}")
        return EXIT_FAILED
    rows = sum(n for counts in report.rows.values() for n in counts.values())
    print(f"backup {report.path} is intact: {len(report.manifest.shards)} shards, "
          f"{format_bytes(report.manifest.size)}, {rows:,} rows, checksums, tables and "
          "indexes checked")
    for line in describe(report.manifest):
        print(line)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    result = backup.restore_backup(args.src, args.to, config, force=args.force,
                                   progress=_progress("restore", args))
    for note in result.notes:
        print(f"note: {note}")
    print(f"restored {result.path} into {result.data_dir} "
          f"({len(result.manifest.shards)} shards, {format_bytes(result.manifest.size)})")
    for p in result.replaced:
        print(f"replaced {p}")
    if result.data_dir.resolve() != config.data_dir.resolve():
        print(f"note: the config's data_dir is {config.data_dir}; point data_dir at "
              f"{result.data_dir} (or move the shard directories there) before `lmshard up`")
    return 0


def add_parsers(sub: Any) -> None:
    """Register backup, verify and restore on the ``lmshard`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"lmshard config file (default: ${ENV_VAR}, "
                        "then ./config/lmshard.toml)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser(
        "backup", parents=[common],
        help="back up every shard of the running service into a new directory in DEST",
        description="Stream a compacted copy of every shard into DEST/lmshard-<UTC time>/ with "
        "a manifest. By default all shards are cut at one point in time (writes pause for a "
        "few milliseconds).")
    p.add_argument("dest", metavar="DEST", help="directory that gets the timestamped backups")
    p.add_argument("--consistent", action=argparse.BooleanOptionalAction, default=True,
                   help="one point in time across shards (default); --no-consistent "
                   "snapshots each shard on its own, with no pause")
    p.add_argument("--keep", type=int, metavar="N",
                   help="afterwards delete all but the newest N backups in DEST")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "verify", parents=[common],
        help="check a backup: checksums, and every table and index of every shard",
        description="Check every shard file against the manifest (size, SHA-256), open each "
        "copy read-only and read every table and index. The schema is imported as the "
        "manifest names it, or taken from -c CONFIG.")
    p.add_argument("dest", metavar="DEST", help="a backup directory, or DEST of `lmshard "
                   "backup` (its newest backup)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "restore", parents=[common],
        help="lay a backup's shards into a data dir (with the service stopped)",
        description="Copy each shard of a backup to DIR/shard-NN/data.mdb, checking it against "
        "the manifest. Refuses a backup whose slot map or schema does not match the config, "
        "and existing shard data unless --force.")
    p.add_argument("src", metavar="SRC", help="a backup directory, or DEST of `lmshard backup` "
                   "(its newest backup)")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="the data dir to restore into (usually the config's data_dir)")
    p.add_argument("--force", action="store_true",
                   help="replace shard data already in DIR (it is lost)")
    p.set_defaults(func=cmd_restore)
