"""The schema the benchmark suite's shard owners serve (``schema = "bench.schema:schema"``).

The tables mirror ``tests.schemas`` (plain ``records``; ``users`` pinned with a unique email
index; ``events`` keyed by (series, uint64), sharded by series) plus a time series table,
which has to be declared in the owners' schema and so cannot borrow the tests' one. Values
are CBOR throughout, as in the peers' layouts, so every system encodes the same bytes.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

import lmshard

RECORDS_ID = "5be1c3a0-2f0d-4c5e-8a11-6d1f00b0e001"
USERS_ID = "5be1c3a0-2f0d-4c5e-8a11-6d1f00b0e002"
EVENTS_ID = "5be1c3a0-2f0d-4c5e-8a11-6d1f00b0e003"
TICKS_ID = "5be1c3a0-2f0d-4c5e-8a11-6d1f00b0e004"

TS_CHUNK_ROWS = 1024
"""Points per stored time series chunk, lmshard's default."""


def record(i: int) -> dict[str, Any]:
    """Row ``i`` of every workload: about 100 bytes of CBOR."""
    return {"id": i, "name": f"user-{i:08d}", "email": email(i), "age": i % 90,
            "score": i * 0.5, "city": "Berlin", "tags": ["alpha", "beta", "gamma"]}


def random_keys(seed: int, count: int, n: int) -> list[int]:
    """``count`` keys drawn uniformly from ``range(n)``, the same for every system."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(count)]


def email(i: int) -> str:
    return f"u{i}@example.com"


TS_T0 = 10**9
"""First time series timestamp, ns. Small enough that Redis's double scores hold it exactly."""
TS_STEP_NS = 10**6
"""One point per millisecond."""


def ts_points(chunk: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``chunk * size`` to ``(chunk + 1) * size`` of any series: int64 ns, float64."""
    i = np.arange(chunk * size, (chunk + 1) * size, dtype=np.int64)
    return TS_T0 + i * TS_STEP_NS, np.sin(i / 100.0)


def ts_queries(spec: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Range queries: windows of ``window`` points at random places of random series, each
    ``(series, start ns, end ns)`` with the end exclusive."""
    total, window = spec["points"], spec["window"]
    starts = random_keys(spec["seed"], spec["count"], total - window + 1)
    picks = random_keys(spec["seed"] + 1, spec["count"], spec["series"])
    return [(series_name(s), TS_T0 + p * TS_STEP_NS, TS_T0 + (p + window) * TS_STEP_NS)
            for s, p in zip(picks, starts, strict=True)]


def series_name(i: int) -> str:
    """Series names have one width: zlmdb's (str, timestamp) keys have no separator."""
    return f"s{i:07d}"


schema = lmshard.Schema("bench")
records = schema.table("records", table_id=RECORDS_ID, key="uint64", value="cbor")
users = schema.table("users", table_id=USERS_ID, key="uint64", value="cbor", pinned=True)
users.index("by_email", lambda v: v["email"], unique=True)
events = schema.table("events", table_id=EVENTS_ID, key=("str", "uint64"), value="cbor",
                      shard_key=1)

try:
    from lmshard.timeseries import TimeSeries
except ImportError:  # an lmshard without time series: NumPy bytes in a uint64-keyed table
    TimeSeries = None
if os.environ.get("LMSHARD_BENCH_TS") == "table":  # that fallback on purpose (owners inherit it)
    TimeSeries = None

ticks: Any
if TimeSeries is not None:
    ticks = TimeSeries(schema, "ticks", table_id=TICKS_ID, chunk_rows=TS_CHUNK_ROWS)
else:
    ticks = schema.table("ticks", table_id=TICKS_ID, key="uint64", value="bytes")
