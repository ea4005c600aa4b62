"""``lmshard bench [--quick] [--only NAME] [--rounds N]``: the benchmark suite from the CLI.

The suite itself lives in the source checkout's ``bench/`` folder (it compares lmshard with
raw py-lmdb, zlmdb and Redis, so it is not part of the installed package). This command runs it
only when this lmshard is the checkout's own code (an editable install): a wheel's lmshard never
imports some checkout's ``bench/``, whose code may not match it. ``make bench`` does the same
with the bench extra installed first.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

SUITE = Path("bench") / "suite.py"
"""The suite, relative to a source checkout's root."""


def find_checkout(package_file: str = __file__) -> Path | None:
    """The source checkout this lmshard runs from (client/lmshard/ops/ -> its root), if it
    holds bench/suite.py; None for an installed package."""
    root = Path(package_file).resolve().parents[3]
    return root if (root / SUITE).is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """``lmshard bench``: the checkout's suite, or exit status 2 saying why it cannot run."""
    root = find_checkout()
    if root is None:
        where = Path(__file__).resolve().parents[1]  # the lmshard package
        print(f"lmshard bench: the benchmark suite is not installed: this lmshard runs from "
              f"{where}, an installed package, and the suite (bench/) ships only with the "
              "source checkout. Clone the repository and run `make bench` there (it installs "
              "lmshard editable with the bench extra).", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite: Any = importlib.import_module("bench.suite")
    return int(suite.run(args))


def add_parsers(subparsers: Any) -> None:
    """Register ``bench [--quick] [--only NAME] [--rounds N]`` on the ``lmshard`` CLI."""
    p = subparsers.add_parser(
        "bench", help="benchmark lmshard against raw py-lmdb, zlmdb and Redis",
        description="Run every workload on lmshard, raw py-lmdb, zlmdb and Redis side by "
        "side; print medians, p99s, peak RSS, ratios and the targets with PASS/MISS. Needs "
        "the source checkout and the bench extra: pip install -e '.[bench]'.")
    p.add_argument("--quick", action="store_true",
                   help="20,000 records and one round: a check that everything runs")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="only these workloads, systems (raw, zlmdb, redis, lmshard) or "
                   "'scaling'; repeat or comma-separate; --list shows the workloads")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="rounds (default 3; 1 with --quick)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write results.json, ops.png and performance.md here (a full run "
                   "writes docs/perf/ and docs/performance.md)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
