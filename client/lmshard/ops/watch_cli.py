"""``lmshard watch``: print the service's committed changes as they happen.

    lmshard watch [TABLE] [--prefix KEY] [--since CURSOR|now|start] [--json] [-c CONFIG]

One line per change: shard, transaction id, op, table, key, value (keys and values as JSON,
the way the table's codecs show them). ``--json`` prints one JSON object per line instead,
with the cursor after the change, for piping into another program. Ctrl-C (or SIGTERM) stops
the watch and prints the cursor to stderr: ``--since`` that cursor carries on with the next
change, missing nothing.

Order is per shard (commit order); changes of different shards interleave as they arrive.
``--prefix`` is a key prefix of TABLE, typed as ``lmshard.keys.key_from_text`` reads it: a
str key as is, uuid canonical, bytes in hex, the int kinds in decimal, a tuple key as a JSON
array of its leading elements (``'["s1"]'``) or its first element's text.

Exit status: 0 stopped by Ctrl-C, 1 failed, 2 bad usage, config or cursor, 4 the cursor is
older than what the change logs keep (the message names the oldest cursor still available).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from typing import Any

from lmshard.client import Client
from lmshard.config import ConfigError, load_config
from lmshard.errors import ChangesCompacted, InvalidCursor, KeyEncodingError, UnknownTable
from lmshard.keys import key_from_text
from lmshard.ops.command import EXIT_COMPACTED, EXIT_OK, EXIT_USAGE, config_option
from lmshard.watch import Change

POLL_SECONDS = 0.5
"""How long one wait for a change lasts; between waits the cursor moves past idle time."""


class _Stop(Exception):
    """SIGTERM: stop like Ctrl-C."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stop


def change_json(change: Change, client: Client) -> dict[str, Any]:
    """One change as a JSON-safe object, with its key and value as the table's codecs show
    them, and the cursor after it."""
    try:
        table = client.schema[change.table]
    except UnknownTable:  # a table this schema does not know: its id and raw bytes
        key: Any = bytes(change.key).hex()
        value: Any = None if change.value is None else bytes(change.value).hex()
    else:
        key = table.key.to_json(change.key)
        value = None if change.value is None else table.value.to_json(change.value)
    return {"shard": change.shard, "txn_id": change.txn_id, "op": change.op,
            "table": change.table, "key": key, "value": value, "cursor": change.cursor}


def change_line(doc: dict[str, Any], width: int | None) -> str:
    """One change as a line for a person: cut to ``width`` columns (a terminal's)."""
    dump = json.dumps
    value = "" if doc["value"] is None else dump(doc["value"], ensure_ascii=False)
    line = (f"shard {doc['shard']:02d} txn {doc['txn_id']:<5} {doc['op']:<6} {doc['table']} "
            f"{dump(doc['key'], ensure_ascii=False)} {value}").rstrip()
    if width is not None and len(line) > width:
        line = line[:width - 1] + "…"
    return line


def _filter(client: Client, table: str | None, text: str | None) -> Any:
    """The key prefix ``--prefix`` names, checked against TABLE (usage errors as ConfigError)."""
    try:
        key = None if table is None else client.schema[table].key
        if text is None:
            return None
        if key is None:
            raise ConfigError("--prefix needs a TABLE",
                              hint="e.g. lmshard watch users --prefix ab")
        prefix = key_from_text(key.spec, text)
        key.encode_prefix(prefix)
        return prefix
    except (UnknownTable, KeyEncodingError) as exc:
        raise ConfigError(exc.message, hint=exc.hint) from None


def cmd_watch(args: argparse.Namespace) -> int:
    """``lmshard watch``: print changes until Ctrl-C, then the cursor to resume from."""
    config = load_config(args.config)
    if not config.changes_enabled:
        raise ConfigError(f"{config.path}: the change log is off ([changes] enabled = false)",
                          hint="switch it on and restart the shard owners")
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    # Ctrl-C and SIGTERM stop the watch even when it was started with SIGINT ignored (a
    # background job of a script): `kill -INT` is how a script ends it and gets its cursor.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)
    with Client(config, local_reads=False) as client:
        prefix = _filter(client, args.table, args.prefix)
        try:
            watch = client.watch(args.table, prefix=prefix, since=args.since)
        except InvalidCursor as exc:
            print(f"lmshard: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ChangesCompacted as exc:
            return _compacted(exc)
        cursor = watch.cursor  # after the last change printed
        try:
            with watch:
                while True:
                    change = watch.get(POLL_SECONDS)
                    if change is None:
                        cursor = watch.cursor  # nothing pending: past the idle time too
                        continue
                    doc = change_json(change, client)
                    if args.json:
                        print(json.dumps(doc, ensure_ascii=False), flush=True)
                    else:
                        print(change_line(doc, width), flush=True)
                    cursor = doc["cursor"]
        except (KeyboardInterrupt, _Stop):
            print(f"lmshard: watch stopped; resume with --since {cursor}", file=sys.stderr)
            return EXIT_OK
        except ChangesCompacted as exc:
            return _compacted(exc)


def _compacted(exc: ChangesCompacted) -> int:
    print(f"lmshard: {exc.message}", file=sys.stderr)
    if exc.oldest is not None:
        print(f"lmshard: the oldest cursor still available is {exc.oldest} (changes before it "
              "are gone: rebuild what they fed, then watch --since it; or --since start)",
              file=sys.stderr)
    else:
        print("lmshard: start again with --since start or --since now", file=sys.stderr)
    return EXIT_COMPACTED


def add_parsers(subparsers: Any) -> None:
    """Register ``watch`` on the ``lmshard`` CLI's subparsers."""
    p = subparsers.add_parser(
        "watch", parents=[config_option()],
        help="print committed changes as they happen, until Ctrl-C",
        description="Print every committed change of the service (or of TABLE, or of the keys "
        "of TABLE starting with --prefix), one line each, until Ctrl-C; then print the cursor "
        "to stderr: --since that cursor resumes after the last change printed. Order is per "
        "shard. Exit status 4 when the cursor is older than the change logs keep.")
    p.add_argument("table", nargs="?", metavar="TABLE", help="only this table's changes")
    p.add_argument("--prefix", metavar="KEY",
                   help="only keys of TABLE starting with KEY (a str key as is, uuid, bytes in "
                   "hex, ints in decimal, a tuple key as a JSON array of its leading elements)")
    p.add_argument("--since", metavar="CURSOR", default="now",
                   help="a cursor printed by an earlier watch, 'now' (default: changes from "
                   "now on) or 'start' (the oldest the change logs keep)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (shard, txn_id, op, table, key, value, "
                   "cursor)")
    p.set_defaults(func=cmd_watch)
