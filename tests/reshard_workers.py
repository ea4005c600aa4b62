"""Worker processes of the re-shard drill (importable, so multiprocessing can spawn them).

A writer owns a range of ``items`` keys and a counter: each round it writes a batch of ten of its
keys (value: the round) and increments its counter once, then reads every key it wrote back at
once (read your writes). A reader reads random keys of every writer and checks that no key ever
goes back to an older round (a stale row from a shard the key moved away from would).
"""

from __future__ import annotations

import json
import random
import time
import traceback
from pathlib import Path

import lmshard

KEYS = 200
"""Keys per writer."""
PER_ROUND = 10


def base(writer: int) -> int:
    return 1_000_000 * (writer + 1)


def writer(config_path: str, w: int, stop: str, out: str, first_round: int = 0) -> None:
    last: dict[int, int] = {}
    rounds = 0
    error = None
    rng = random.Random(w)
    try:
        with lmshard.connect(config_path, timeout_ms=2000, retries=10) as c:
            while not Path(stop).exists():
                keys = rng.sample(range(base(w), base(w) + KEYS), PER_ROUND)
                r = first_round + rounds
                with c.batch() as b:
                    for k in keys:
                        b.put("items", k, {"group": w, "r": r, "k": k})
                    b.incr("counters", f"rs-{w}", 1)
                rounds += 1
                for k in keys:
                    last[k] = r
                    got = c.get("items", k)
                    if got != {"group": w, "r": r, "k": k}:
                        raise AssertionError(f"read your write: key {k} round {r}, got {got}")
            moves = c.counters()
    except BaseException:
        error = traceback.format_exc()
        moves = {}
    Path(out).write_text(json.dumps({"last": last, "rounds": rounds, "error": error,
                                     "counters": moves}))


def reader(config_path: str, writers: int, stop: str, out: str) -> None:
    seen: dict[int, int] = {}
    reads = 0
    error = None
    rng = random.Random(1000 + writers)
    try:
        with lmshard.connect(config_path, timeout_ms=2000, retries=10) as c:
            while not Path(stop).exists():
                w = rng.randrange(writers)
                k = base(w) + rng.randrange(KEYS)
                got = c.get("items", k)
                reads += 1
                if got is None:
                    if k in seen:
                        raise AssertionError(f"key {k} was at round {seen[k]}, now missing")
                    continue
                if got["r"] < seen.get(k, -1):
                    raise AssertionError(f"key {k} went back from round {seen[k]} to "
                                         f"{got['r']}")
                seen[k] = got["r"]
                if reads % 500 == 0:  # a whole-table count and a scan now and then
                    n = c.count("items")
                    keys = [key for key, _ in c.scan("items")]
                    if len(keys) != len(set(keys)) or len(keys) < len(seen) or n < len(seen):
                        raise AssertionError(f"scan of {len(keys)} rows ({len(set(keys))} "
                                             f"distinct), count {n}, {len(seen)} keys seen")
                time.sleep(0.0005)
    except BaseException:
        error = traceback.format_exc()
    Path(out).write_text(json.dumps({"reads": reads, "error": error}))
