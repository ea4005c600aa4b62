"""How a workload's operations are timed, the same way for every system.

Every operation is a one-argument function called once per item. Slow operations (anything
that crosses a process, fsyncs or moves a batch) are each timed; fast in-process ones are
sampled, one in ``FAST_SAMPLE`` timed, because a clock read costs about as much as a tenth of
a point get. Throughput never comes from these latencies: it is items over the wall-clock span
of the whole run (see bench.procs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

FAST_SAMPLE = 16
"""Time one fast operation in this many; the rest run between clock reads."""
SCAN_PAGE = 1000
"""A scan's latency is timed per this many rows."""


def each(op: Callable[[Any], object], items: Sequence[Any]) -> tuple[int, list[int]]:
    """Run ``op`` on every item, timing each call."""
    clock = time.perf_counter_ns
    lat: list[int] = []
    add = lat.append
    for x in items:
        t = clock()
        op(x)
        add(clock() - t)
    return len(items), lat


def sampled(op: Callable[[Any], object], items: Sequence[Any],
            every: int = FAST_SAMPLE) -> tuple[int, list[int]]:
    """Run ``op`` on every item, timing one call in ``every``."""
    clock = time.perf_counter_ns
    lat: list[int] = []
    add = lat.append
    for s in range(0, len(items), every):
        t = clock()
        op(items[s])
        add(clock() - t)
        for x in items[s + 1:s + every]:
            op(x)
    return len(items), lat


def pages(rows: Iterator[Any], page: int = SCAN_PAGE) -> tuple[int, list[int]]:
    """Drain ``rows``, timing each page of ``page`` rows; the number of rows and page times."""
    clock = time.perf_counter_ns
    lat: list[int] = []
    n = 0
    while True:
        t = clock()
        got = len(list(islice(rows, page)))
        if not got:
            return n, lat
        lat.append(clock() - t)
        n += got
