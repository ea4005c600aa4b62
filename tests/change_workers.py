"""Worker processes for the change-log tests (importable, so multiprocessing can spawn them)."""

from __future__ import annotations

import json
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
