"""``lmshard reshard``: move slots between the shards of a running service (docs/resharding.md).

    lmshard reshard --shards M [-c CONFIG]            grow or shrink to M shards
    lmshard reshard --move FIRST-LAST --to N [-c ..]  move one slot range to shard N
    lmshard reshard --status [-c CONFIG]              the re-shard under way, each shard's slots
    lmshard reshard --resume [-c CONFIG]              go on with an interrupted re-shard
    lmshard reshard --rollback [-c CONFIG]            undo the move under way (not switched yet)

Progress shows as a bar on a terminal and as plain lines otherwise. Exit status: 0 done,
1 failed (the state file keeps where it stopped: --resume or --rollback), 2 bad usage or config
(nothing changed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lmshard.config import Config, load_config
from lmshard.errors import Error
from lmshard.ops.command import EXIT_OK, EXIT_USAGE, config_option, say
from lmshard.resharding.admin import OwnerAdmin
from lmshard.resharding.plan import PlanError, show_slots
from lmshard.resharding.run import Reshard, under_way
from lmshard.resharding.service import config_naming
from lmshard.resharding.state import command_lock

PLAIN_INTERVAL = 1.0
"""Seconds between two plain progress lines of one step."""


class PlainProgress:
    """Progress as plain lines: one per step and second while it runs (``copy: 12000 rows``),
    one when it is done (``copy: 45000 of 45000``)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total and done >= total
        if not finished and now - self._last.get(what, now) < PLAIN_INTERVAL:
            self._last.setdefault(what, now)
            return
        self._last[what] = now
        if finished:
            self._last.pop(what, None)
        say(f"  {what}: {done} of {total}" if total else f"  {what}: {done} so far")

    def close(self) -> None:
        pass


class BarProgress:
    """Progress as a rich bar per step on a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), transient=True)
        self.progress.start()
        self._tasks: dict[str, Any] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        task = self._tasks.get(what)
        if task is None:
            task = self._tasks[what] = self.progress.add_task(what, total=total or None)
        self.progress.update(task, completed=done, total=total or None)

    def close(self) -> None:
        self.progress.stop()


def print_status(config: Config, as_json: bool) -> int:
    """``--status``: the state file and each shard's slot state (``slot_state`` read)."""
    state = under_way(config)
    shards = max([config.shards, *((state.shards, state.old_shards) if state else ())])
    rows: list[dict[str, Any]] = []
    with OwnerAdmin(config_naming(config, shards), retries=0, owner_wait=0) as admin:
        for n in range(shards):
            try:
                st, txn = admin.state(n)
            except Error as exc:
                rows.append({"shard": n, "error": exc.message})
                continue
            rows.append({"shard": n, "txn": txn, "slots": st.map.slot_counts()[n]
                         if n < st.map.shards else 0, **st.to_wire()})
    if as_json:
        say(json.dumps({"reshard": state.to_json() if state else None, "shards": rows},
                       indent=1, sort_keys=True))
        return EXIT_OK
    say(f"re-shard under way: {state.describe()}" if state else "no re-shard under way")
    if state and state.pauses_ms:
        say(f"write pauses so far: {', '.join(f'{p:.1f} ms' for p in state.pauses_ms)}")
    say(f"config: {config.shards} shards, slot map version {config.slot_map_version}")
    for r in rows:
        if "error" in r:
            say(f"shard {r['shard']:<3} does not answer: {r['error']}")
            continue
        moving = " ".join(f"{k} {show_slots(_slots(r[k]))}" for k in
                          ("frozen", "incoming", "outgoing") if r[k])
        say(f"shard {r['shard']:<3} version {r['version']:<4} {r['slots']:>5} slots"
            + (f"  {moving}" if moving else ""))
    return EXIT_OK


def _slots(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b)}


def cmd_reshard(args: argparse.Namespace) -> int:
    """``lmshard reshard``: start, go on with, roll back or show a re-shard."""
    config = load_config(args.config)
    if args.status:
        return print_status(config, args.json)
    if args.to is not None and args.move is None:
        print("lmshard: --to goes with --move FIRST-LAST", file=sys.stderr)
        return EXIT_USAGE
    progress = BarProgress() if sys.stdout.isatty() else PlainProgress()
    try:
        with command_lock(config):
            _run(Reshard(config, say, progress), args)
    except PlanError as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        progress.close()
    return EXIT_OK


def _run(run: Reshard, args: argparse.Namespace) -> None:
    if args.resume:
        run.resume()
    elif args.rollback:
        run.rollback()
    else:
        run.start(shards=args.shards, move=args.move, to=args.to)


def add_parsers(subparsers: Any) -> None:
    """Register ``reshard`` on the ``lmshard`` CLI."""
    p = subparsers.add_parser(
        "reshard", parents=[config_option()],
        help="move slots between shards while the service runs (grow, shrink, one range)",
        description="Move slots between the shards of a running service: --shards M grows or "
        "shrinks it, --move FIRST-LAST --to N moves one slot range. Writes to a moving range "
        "wait a few milliseconds at its switch; clients follow by themselves. See "
        "docs/resharding.md.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shards", type=int, metavar="M", help="grow or shrink to M shards")
    mode.add_argument("--move", metavar="FIRST-LAST",
                      help="move slots FIRST to LAST (inclusive) to the shard --to")
    mode.add_argument("--status", action="store_true",
                      help="show the re-shard under way and each shard's slot state")
    mode.add_argument("--resume", action="store_true",
                      help="go on with an interrupted re-shard from where it stopped")
    mode.add_argument("--rollback", action="store_true",
                      help="undo the move under way (unless it switched) and stop")
    p.add_argument("--to", type=int, metavar="SHARD", help="the shard --move moves slots to")
    p.add_argument("--json", action="store_true", help="--status as JSON")
    p.set_defaults(func=cmd_reshard)
