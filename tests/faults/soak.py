"""``python -m tests.faults.soak`` (``make soak``): one long history under mixed load with a
fault every 20-40 s, checked like any other (a key's search goes chunk by chunk, so its cost
grows with the history's length, not faster: see ``checker.chunks``), with the owners' RSS and
open fds and the reader slots held sampled every 30 s: they must end where they started
(faults aside; RSS is judged by its anonymous part, see ``JUDGED``). Anomalies, undecided
keys or a resource that grew fail it.

    python -m tests.faults.soak [--minutes 10] [--workers 4] [--seed X]
"""

from __future__ import annotations

import argparse
import sys

from tests.faults.campaign import FAULT_KINDS, run_history

SAMPLE_EVERY = 30.0
"""Seconds between resource samples."""
GROWTH_LIMIT = 1.25
"""An owner resource ending more than this much above its first sample counts as a leak."""
JUDGED = ("anon_kib", "fds", "reader_slots")
"""The owner resources judged: anonymous RSS (heap, stacks), open fds, reader slots. RSS as a
whole is printed, not judged: it counts the data files' pages an owner has mapped, so it grows
with the data files (printed too), which grow under this load with the live data bounded."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    s = run_history(60 * args.minutes, workers=args.workers, seed=args.seed,
                    interval=(20.0, 40.0), sample_every=SAMPLE_EVERY)
    print(f"seed        {s.seed}, {args.minutes:g} minutes of load, checked "
          f"{s.checked_in:.0f} s after it")
    print(f"operations  {s.operations:,}  (" + ", ".join(
        f"{k} {s.outcomes[k]:,}" for k in ("ok", "fail", "unknown", "maybe")) + ")")
    print("faults      " + ", ".join(f"{k} {s.faults[k]}" for k in FAULT_KINDS))
    print(f"anomalies   {len(s.anomalies)}")
    for a in s.anomalies[:50]:
        print(f"  {a}")
    print(f"undecided   {len(s.undecided)} keys (search budget)")
    for u in s.undecided[:50]:
        print(f"  {u}")
    print("sample  owners  RSS MiB  anon MiB  open fds  reader slots  data MiB")
    t0 = s.samples[0]["t"] if s.samples else 0.0
    for x in s.samples:
        print(f"{x['t'] - t0:6.0f}  {x['owners']:6d}  {x['rss_kib'] / 1024:7.1f}  "
              f"{x['anon_kib'] / 1024:8.1f}  {x['fds']:8d}  {x['reader_slots']:12d}  "
              f"{x['data_kib'] / 1024:8.1f}")
    leaks = []
    full = [x for x in s.samples if x["owners"] == max(y["owners"] for y in s.samples)]
    if len(full) >= 2:  # samples taken while every owner ran (not mid-restart)
        first, last = full[0], full[-1]
        for what in JUDGED:
            if last[what] > max(first[what] * GROWTH_LIMIT, first[what] + 4):
                leaks.append(f"{what}: {first[what]} at the start, {last[what]} at the end")
        print("start->end  " + ", ".join(
            f"{label} {first[w] / div:.{prec}f} -> {last[w] / div:.{prec}f}"
            for label, w, div, prec in (
                ("RSS MiB", "rss_kib", 1024, 1), ("anon MiB", "anon_kib", 1024, 1),
                ("open fds", "fds", 1, 0), ("reader slots", "reader_slots", 1, 0),
                ("data MiB", "data_kib", 1024, 1))))
    for leak in leaks:
        print(f"grew: {leak}")
    return 1 if s.anomalies or s.undecided or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
