"""Worker processes for the change-log tests (importable, so multiprocessing can spawn them)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import lmshard


def read_only_watcher(path: str, cursor: str, count: int, out: str) -> None:
    """Open the store at ``path`` read-only, watch its log from ``cursor`` until ``count``
    changes came (30 s at most), and write them to ``out``."""
    from tests.conftest import make_schema

    seen: list[list[object]] = []
    try:
        with lmshard.open(path, make_schema(), readonly=True) as s:
            w = s.watch(since=cursor)
            while len(seen) < count:
                c = w.get(30)
                if c is None:
                    break
                seen.append([c.table, str(c.key), c.value, c.txn_id, c.cursor])
        Path(out).write_text(json.dumps({"error": None, "seen": seen}))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc(), "seen": seen}))


def norm(x: object) -> object:
    """``x`` as it reads back from JSON (tuples as lists, UUIDs as strings)."""
    return json.loads(json.dumps(x, default=str))


def feed_writer(config_path: str, worker: int, seconds: float, out: str) -> None:
    """Write batches over all shards for ``seconds``: puts of new events and items, an
    increment of the worker's counter, a delete of the item put two batches back, and every
    tenth batch one that a unique index refuses. Write every batch's fate to ``out``: acked
    (with its effects as the change log should hold them and its txn ids), refused, unknown."""
    import uuid

    from lmshard.errors import UniqueViolation

    acked: list[dict[str, object]] = []
    refused: list[str] = []
    unknown: list[list[object]] = []
    result: dict[str, object] = {"acked": acked, "refused": refused, "unknown": unknown}
    try:
        with lmshard.connect(config_path, timeout_ms=300, retries=60) as c:
            deadline = time.monotonic() + seconds
            n = 0
            maybe_gone: set[int] = set()  # items whose put's fate is unknown
            while time.monotonic() < deadline:
                item = worker * 1_000_000 + n
                effects: list[list[object]] = [
                    ["events", [f"w{worker}-{n % 7}", n], {"w": worker, "n": n}],
                    ["items", item, {"group": worker, "n": n}],
                ]
                try:
                    with c.batch() as b:
                        b.put("events", (f"w{worker}-{n % 7}", n), {"w": worker, "n": n})
                        b.put("items", item, {"group": worker, "n": n})
                        b.incr("counters", f"w{worker}", 1)
                        if n >= 2:
                            b.delete("items", item - 2)
                except Exception as exc:  # noqa: BLE001 - its fate is unknown: at most once
                    unknown.append([n, repr(exc), effects])
                    maybe_gone.add(item)
                else:
                    effects.append(["counters", f"w{worker}", b.results[2]])
                    if n >= 2 and (item - 2) not in maybe_gone:
                        effects.append(["items", item - 2, None])
                    acked.append({"n": n, "txn_ids": b.txn_ids, "effects": norm(effects)})
                if n % 10 == 5:  # a batch a unique index refuses: none of it is applied
                    fresh, dup = uuid.uuid4(), uuid.uuid4()
                    try:
                        with c.batch() as b:
                            b.put("users", fresh, {"email": f"{fresh}@x", "country": "de"})
                            b.put("users", dup, {"email": "taken@x", "country": "de"})
                    except UniqueViolation:
                        refused += [str(fresh), str(dup)]
                n += 1
            result["retries"] = c.counters()["retries"]
        result["error"] = None
    except BaseException:
        result["error"] = traceback.format_exc()
    Path(out).write_text(json.dumps(result))


def feed_watcher(config_path: str, start: str, out: str, stop: str, shards: int) -> None:
    """Follow ``client.watch()`` and append each change with the cursor after it to ``out``,
    one line per change in one write (the file is the watcher's cursor store). A restarted
    watcher carries on from the cursor of the file's last line. Ends once ``stop`` names
    each shard's last transaction and the watch is past all of them."""
    import os

    from lmshard.changes import parse_cursor

    cursor = start
    if os.path.exists(out):
        with open(out, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # killed mid-line (one write: should not happen)
            with open(out, "r+b") as f:
                f.truncate(len(complete))
        if complete:
            cursor = json.loads(complete.splitlines()[-1])[-1]
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        with lmshard.connect(config_path) as c, c.watch(since=cursor) as w:
            targets = None
            while True:
                ch = w.get(0.3)
                if ch is not None:
                    line = json.dumps([ch.shard, ch.txn_id, ch.table, norm(ch.key),
                                       norm(ch.value), ch.cursor]) + "\n"
                    os.write(fd, line.encode())
                    continue
                if targets is None and os.path.exists(stop):
                    targets = json.loads(Path(stop).read_text())
                if targets is not None:
                    pos = parse_cursor(w.cursor, shards)
                    if all(pos[s].txn > targets[s] for s in range(shards)):
                        break
    except BaseException:
        Path(out + ".error").write_text(traceback.format_exc())
    finally:
        os.close(fd)
