"""Every shard's stats as text: the cells of ``lmshard stats`` and ``lmshard top``, their
headline, and the plain table ``lmshard stats`` prints.

The input is a board snapshot (``lmshard.stats_board.StatsBoard.snapshot``, or the monitor's
reply); ``lmshard.ops.top`` draws the same cells in colour.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from lmshard.units import format_bytes

WARN_FRACTION = 0.8
"""``top`` colours map use and reader slots above this fraction of their limits."""
ALERT_FRACTION = 0.95
"""... and in red above this one."""


def format_seconds(s: float | None) -> str:
    """A duration in seconds, minutes, hours or days, as fits; ``"-"`` for None."""
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _ms(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.2f}"


def _num(x: Any, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _fraction(used: Any, limit: Any) -> float | None:
    if not used or not limit:
        return 0.0 if limit else None
    return float(used) / float(limit)


def level(fraction: float | None) -> int:
    """0 fine, 1 warn (above WARN_FRACTION), 2 alert (above ALERT_FRACTION)."""
    if fraction is None or fraction <= WARN_FRACTION:
        return 0
    return 2 if fraction > ALERT_FRACTION else 1


def state_text(entry: dict[str, Any]) -> str:
    """``up``, or how long a shard has been silent (``STALE``) or never heard (``NO DATA``)."""
    if entry["up"]:
        return "up"
    if not entry["seen"]:
        return f"NO DATA {format_seconds(entry['age'])}"
    return f"STALE {format_seconds(entry['age'])}"


COLUMNS = ("shard", "state", "writes/s", "batches/s", "ops/batch p50/p99", "commit ms p50/p99/max",
           "queue", "acked", "failed", "map used/size", "map %max", "readers", "rows", "txn",
           "uptime")
"""The per-shard columns of ``lmshard stats`` and ``lmshard top``."""


def shard_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One shard's cells (strings), plus ``map_level``/``readers_level`` for colouring.

    A stale shard keeps its last known counters, sizes and rows, but not its rates, quantiles
    and queue depth: those describe a window that is over.
    """
    s = entry.get("stats") or {}
    have = bool(s)
    live = have and entry["up"]
    rates = (s.get("rates") or {}) if live else {}
    lat = (s.get("commit_seconds") or {}) if live else {}
    opb = (s.get("ops_per_batch") or {}) if live else {}
    map_frac = _fraction(s.get("map_used"), s.get("max_map_size"))
    rd_frac = _fraction(s.get("readers_used"), s.get("max_readers"))
    cells = {
        "shard": str(entry["shard"]),
        "state": state_text(entry),
        "writes/s": _num(rates.get("writes")),
        "batches/s": _num(rates.get("batches")),
        "ops/batch p50/p99": (f"{_num(opb.get('p50'))}/{_num(opb.get('p99'))}"
                              if live else "-"),
        "commit ms p50/p99/max": (f"{_ms(lat.get('p50'))}/{_ms(lat.get('p99'))}/"
                                  f"{_ms(lat.get('max'))}" if live else "-"),
        "queue": (f"{s.get('queue_depth', 0)} (max {s.get('queue_depth_max', 0)})"
                  if live else "-"),
        "acked": _num(s.get("batches")),
        "failed": _num(s.get("failed_batches")),
        "map used/size": (f"{format_bytes(s.get('map_used'))}/{format_bytes(s.get('map_size'))}"
                          if have else "-"),
        "map %max": "-" if map_frac is None else f"{map_frac * 100:.1f}%",
        "readers": (f"{s.get('readers_used', 0)}/{s.get('max_readers', 0)}" if have else "-"),
        "rows": _num(sum((s.get("tables") or {}).values()) if have else None),
        "txn": _num(s.get("last_txn_id"), "d"),
        "uptime": format_seconds(s.get("uptime")) if live else "-",
    }
    return {"cells": cells, "map_level": level(map_frac), "readers_level": level(rd_frac),
            "up": entry["up"], "seen": entry["seen"]}


def totals(snap: dict[str, Any]) -> dict[str, float]:
    """Sums over the shards that are up: writes/s, batches/s, ops, acked and failed batches."""
    out = {"writes": 0.0, "batches": 0.0, "ops": 0.0, "acked": 0.0, "failed": 0.0}
    for entry in snap["shards"]:
        s = entry.get("stats")
        if not entry["up"] or not s:
            continue
        out["writes"] += s["rates"].get("writes") or 0
        out["batches"] += s["rates"].get("batches") or 0
        out["ops"] += s.get("ops", 0)
        out["acked"] += s.get("batches", 0)
        out["failed"] += s.get("failed_batches", 0)
    return out


def table_rows(snap: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows per table and shard: (table names, one row of counts per shard, "-" if unknown)."""
    names: list[str] = []
    for entry in snap["shards"]:
        for name in (entry.get("stats") or {}).get("tables") or {}:
            if name not in names:
                names.append(name)
    rows = []
    for entry in snap["shards"]:
        tables = (entry.get("stats") or {}).get("tables")
        rows.append([str(entry["shard"])] + [
            "-" if tables is None or name not in tables else f"{tables[name]:,}"
            for name in names])
    return names, rows


def headline(snap: dict[str, Any]) -> str:
    """The first line of ``stats`` and ``top``: shards up, writes/s and batches/s in all."""
    t = totals(snap)
    where = snap.get("config") or "(no file)"
    return (f"lmshard {where}: {snap['shards_up']}/{snap['shards_total']} shards up, "
            f"{t['writes']:,.0f} writes/s, {t['batches']:,.0f} batches/s "
            f"(interval {snap['interval']:g}s, stale after {snap['stale_after']:g}s, "
            f"from {snap.get('source', 'direct')}) at {time.strftime('%H:%M:%S')}")


def _plain_table(header: Iterable[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns: the first ``left`` to the left, the others (numbers) to the right."""
    header = list(header)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < left else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def render_text(snap: dict[str, Any]) -> str:
    """The plain table ``lmshard stats`` prints."""
    lines = [headline(snap), ""]
    rows = [[shard_row(e)["cells"][c] for c in COLUMNS] for e in snap["shards"]]
    lines += _plain_table(COLUMNS, rows, left=2)
    names, trows = table_rows(snap)
    if names:
        lines += ["", "rows per table"]
        lines += _plain_table(["shard", *names], trows)
    return "\n".join(lines)

