"""``python -m tests.faults`` (``make faults``): histories under a nemesis, checked, and a
summary table: histories, operations by outcome, faults by kind, anomalies found.

    python -m tests.faults [--minutes M | --histories N] [--seconds S] [--seed X] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from tests.faults.campaign import FAULT_KINDS, Summary, run_history


def report(summaries: list[Summary]) -> str:
    outcomes: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for s in summaries:
        outcomes.update(s.outcomes)
        faults.update(s.faults)
    anomalies = [f"seed {s.seed}: {a}" for s in summaries for a in s.anomalies]
    lines = [f"histories   {len(summaries)}",
             f"operations  {sum(s.operations for s in summaries):,}  (" + ", ".join(
                 f"{k} {outcomes[k]:,}" for k in ("ok", "fail", "unknown", "maybe")) + ")",
             "faults      " + ", ".join(f"{k} {faults[k]}" for k in FAULT_KINDS),
             f"anomalies   {len(anomalies)}",
             f"undecided   {sum(len(s.undecided) for s in summaries)} keys (search budget)"]
    return "\n".join(lines + [f"  {a}" for a in anomalies[:50]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    ap.add_argument("--minutes", type=float, help="run histories for this long")
    ap.add_argument("--histories", type=int, help="run this many histories")
    ap.add_argument("--seconds", type=float, default=15.0, help="each history's load (15)")
    ap.add_argument("--workers", type=int, default=4, help="client processes (4)")
    ap.add_argument("--seed", type=int, help="the first history's seed (random)")
    ap.add_argument("--keep", type=Path, help="copy each history's files here")
    args = ap.parse_args(argv)
    if args.histories is None and args.minutes is None:
        args.histories = 1
    end = time.monotonic() + 60 * args.minutes if args.minutes else None
    summaries: list[Summary] = []
    while (args.histories is None or len(summaries) < args.histories) and (
            end is None or time.monotonic() < end):
        seed = None if args.seed is None else args.seed + len(summaries)
        s = run_history(args.seconds, workers=args.workers, seed=seed, keep=args.keep)
        summaries.append(s)
        print(f"history {len(summaries)}: seed {s.seed}, {s.operations:,} operations, "
              f"{sum(s.faults.values())} faults, {len(s.anomalies)} anomalies, "
              f"{len(s.undecided)} undecided", flush=True)
        for a in s.anomalies + s.undecided:
            print(f"  {a}", flush=True)
    print(report(summaries))
    # an undecided key is a history not proven allowed: it fails the run, as in the soak
    return 1 if any(s.anomalies or s.undecided for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
