"""``lmshard top`` and ``lmshard stats``: every shard's stats for an operator.

    lmshard stats [--json] [--direct] [-c CONFIG]    one look at every shard (table or JSON)
    lmshard top [--once] [--interval S] [-c CONFIG]  a live view, refreshed every S seconds

``stats`` asks a running monitor for its board and, when none answers on
``monitor.endpoint``, subscribes to the shards itself (``lmshard.stats_board``); ``top``
always subscribes and redraws a rich table laid out for the terminal's width. Exit status of
``stats``: 0 every shard reports, 1 some shard is stale or silent, 2 bad usage or config.
``lmshard.cli`` adds both commands with :func:`add_parsers`; rich is imported only when a frame
is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from lmshard.config import ENV_VAR, Config, ConfigError, load_config
from lmshard.ops.stats_table import (
    WARN_FRACTION,
    headline,
    render_text,
    shard_row,
    table_rows,
)
from lmshard.stats_board import StatsBoard, StatsSubscriber, collect, query_monitor
from lmshard.stats_wire import worst_replica

EXIT_STALE = 1
"""``lmshard stats`` exit status when some shard is stale or never reported."""
TOP_WIDTH = 200
"""Columns ``top --once`` renders when stdout is not a terminal (a terminal's own width else)."""


def gather(config: Config, *, direct: bool = False) -> dict[str, Any]:
    """A snapshot from the monitor if one answers (unless ``direct``), else from the shards."""
    snap = None if direct else query_monitor(config)
    if snap is not None:
        snap["source"] = "monitor"
        return snap
    snap = collect(config).snapshot()
    snap["source"] = "direct"
    return snap


# --------------------------------------------------------------------------------------------
# The live view
# --------------------------------------------------------------------------------------------

_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int = 16) -> str:
    """The last ``width`` values as bars scaled to their maximum (None values left out)."""
    vals = [v for v in values[-width:] if v is not None]
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return _SPARK[0] * len(vals)
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))]
                   for v in vals)


_LEVEL_STYLE = ("", "bold yellow", "bold red")
_GAP = 2
"""Spaces between two columns of ``top``'s tables (one cell of padding on either side)."""


Justify = Literal["left", "right"]


@dataclass(frozen=True)
class TopColumn:
    """One column of ``lmshard top``'s shard table (see :data:`TOP_COLUMNS`)."""

    header: str
    width: int
    """Cells the column keeps even when its content is narrower (a steady layout)."""
    priority: float
    """0 is the last column dropped as the terminal narrows; the highest number goes first."""
    cell: Callable[[dict[str, Any], dict[str, Any]], str]
    """The cell's text, from the snapshot's entry and its :func:`shard_row`."""
    style: Callable[[dict[str, Any]], str] | None = None
    """The cell's style, from the :func:`shard_row`."""
    justify: Justify = "right"


def _cells(name: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    return lambda entry, row: str(row["cells"][name])


def _replica_lag(entry: dict[str, Any], row: dict[str, Any]) -> str:
    """The replica furthest behind: transactions and seconds not applied ("-" for none)."""
    s = entry.get("stats") or {}
    worst = worst_replica(s.get("replication")) if entry.get("up") else None
    if worst is None:
        return "-"
    return f"{worst.get('lag_txns', 0)} {worst.get('lag_seconds', 0.0):.1f}s"


def _has_replicas(entry: dict[str, Any]) -> bool:
    return bool(((entry.get("stats") or {}).get("replication") or {}).get("replicas"))


def _trend(entry: dict[str, Any], row: dict[str, Any]) -> str:
    return sparkline([h.get("writes") for h in entry.get("history") or []])


TOP_COLUMNS: tuple[TopColumn, ...] = (
    TopColumn("shard", 5, 0, _cells("shard"), justify="left"),
    TopColumn("state", 12, 1, _cells("state"), justify="left",
              style=lambda row: "green" if row["up"] else "bold red"),
    TopColumn("writes/s", 8, 2, _cells("writes/s")),
    TopColumn("batches/s", 9, 3, _cells("batches/s")),
    TopColumn("ops/batch p50/p99", 17, 10, _cells("ops/batch p50/p99")),
    TopColumn("commit ms p50/p99/max", 21, 4, _cells("commit ms p50/p99/max")),
    TopColumn("queue", 9, 8, _cells("queue")),
    TopColumn("acked", 6, 9, _cells("acked")),
    TopColumn("failed", 6, 7, _cells("failed")),
    TopColumn("map used/size", 17, 12, _cells("map used/size")),
    TopColumn("map %max", 8, 5, _cells("map %max"),
              style=lambda row: _LEVEL_STYLE[row["map_level"]]),
    TopColumn("readers", 7, 6, _cells("readers"),
              style=lambda row: _LEVEL_STYLE[row["readers_level"]]),
    TopColumn("rows", 7, 13, _cells("rows")),
    TopColumn("txn", 5, 14, _cells("txn")),
    TopColumn("uptime", 6, 11, _cells("uptime")),
    TopColumn("writes/s trend", 16, 15, _trend, justify="left"),
)
"""``lmshard top``'s shard table, in display order: every column of :data:`COLUMNS` and the
trend, and when some shard has replicas the worst replica's lag (transactions and seconds not
applied). On a narrow terminal whole columns are dropped, highest ``priority`` first, until the
rest fits; a header is never shortened. At 80 columns shard, state, writes/s, batches/s, commit
latency and map %max remain."""

REPLICA_LAG = TopColumn("replica lag", 11, 2.5, _replica_lag)
"""Shown after state when some shard has replicas: its worst replica's lag, transactions and
seconds not applied. It goes after writes/s, before batches/s, which then goes after map %max:
at 80 columns it takes batches/s's place."""


def top_columns(replicas: bool) -> list[TopColumn]:
    """The shard table's columns: :data:`TOP_COLUMNS`, and with ``replicas``
    :data:`REPLICA_LAG`."""
    if not replicas:
        return list(TOP_COLUMNS)
    out = []
    for col in TOP_COLUMNS:
        out.append(dataclasses.replace(col, priority=5.5) if col.header == "batches/s" else col)
        if col.header == "state":
            out.append(REPLICA_LAG)
    return out


def fit_columns(widths: list[int], priorities: list[float], available: int,
                keep: int = 1) -> list[int]:
    """Which columns fit in ``available`` cells (their indices, in display order).

    Columns are taken by priority (lowest number first) while they fit, ``_GAP`` cells apart;
    the first column that does not fit ends the choice, so what is shown is always the most
    important ones. The ``keep`` most important are shown even if they do not fit.
    """
    chosen: list[int] = []
    used = -_GAP
    for rank, i in enumerate(sorted(range(len(widths)), key=lambda i: priorities[i])):
        if rank >= keep and used + _GAP + widths[i] > available:
            break
        used += _GAP + widths[i]
        chosen.append(i)
    return sorted(chosen)


def _fixed_table(headers: list[str], justify: list[Justify], widths: list[int], **kw: Any) -> Any:
    """A borderless table whose columns are exactly ``widths`` wide (no squeezing, no …)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, _GAP // 2), **kw)
    for header, just, width in zip(headers, justify, widths, strict=True):
        table.add_column(header, justify=just, width=width, min_width=width,
                         overflow="fold")
    return table


def shard_table(snap: dict[str, Any], width: int) -> Any:
    """``top``'s shard table for a terminal ``width`` cells wide (see :data:`TOP_COLUMNS`)."""
    from rich.cells import cell_len
    from rich.text import Text

    columns = top_columns(any(_has_replicas(entry) for entry in snap["shards"]))
    rows = [(entry, shard_row(entry)) for entry in snap["shards"]]
    texts = [[col.cell(entry, row) for col in columns] for entry, row in rows]
    widths = [max([col.width, cell_len(col.header), *(cell_len(t[i]) for t in texts)])
              for i, col in enumerate(columns)]
    shown = fit_columns(widths, [col.priority for col in columns], width, keep=2)
    table = _fixed_table([columns[i].header for i in shown],
                         [columns[i].justify for i in shown], [widths[i] for i in shown])
    for (_entry, row), cells in zip(rows, texts, strict=True):
        styled = []
        for i in shown:
            style = columns[i].style
            styled.append(Text(cells[i], style=style(row) if style else ""))
        table.add_row(*styled, style="" if row["up"] else "dim")
    return table


def rows_table(snap: dict[str, Any], width: int) -> list[Any]:
    """``top``'s rows per table and shard, as many tables as fit ``width``; [] without tables."""
    from rich.cells import cell_len
    from rich.text import Text

    names, trows = table_rows(snap)
    if not names:
        return []
    headers = ["shard", *names]
    widths = [max([cell_len(h), *(cell_len(r[i]) for r in trows)])
              for i, h in enumerate(headers)]
    shown = fit_columns(widths, list(range(len(headers))), width, keep=2)
    justify: list[Justify] = ["left" if i == 0 else "right" for i in shown]
    table = _fixed_table([headers[i] for i in shown], justify, [widths[i] for i in shown],
                         title="rows per table", title_justify="left")
    for r in trows:
        table.add_row(*(r[i] for i in shown))
    parts: list[Any] = [Text(""), table]
    if len(shown) < len(headers):
        hidden = len(headers) - len(shown)
        parts.append(Text(f"{hidden} more table{'s' if hidden > 1 else ''} not shown at this "
                          "width (lmshard stats lists them)", style="dim"))
    return parts


class _AtWidth:
    """A renderable built when rendered, for the width there is then: a resized terminal gets
    a fitting layout at the next refresh."""

    def __init__(self, build: Callable[[int], Any]) -> None:
        self.build = build

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        from rich.console import Group

        yield Group(*self.build(options.max_width))


def render_top(snap: dict[str, Any]) -> Any:
    """One frame of ``lmshard top``: a rich renderable (headline, shard table, rows table),
    laid out for the console's width when it is printed."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [Text(headline(snap), style="bold"),
                        _AtWidth(lambda width: [shard_table(snap, width),
                                                *rows_table(snap, width)])]
    warn = [e["shard"] for e in snap["shards"]
            if max(shard_row(e)["map_level"], shard_row(e)["readers_level"])]
    if warn:
        parts.append(Text(f"shards {', '.join(map(str, warn))}: map or reader slots above "
                          f"{WARN_FRACTION:.0%} of their limit", style="bold yellow"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    """``lmshard stats``: print every shard's stats once; the exit status."""
    config = load_config(args.config)
    snap = gather(config, direct=args.direct)
    if args.json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        print(render_text(snap))
    return 0 if snap["shards_up"] == snap["shards_total"] else EXIT_STALE


def _console(file: Any = None) -> Any:
    from rich.console import Console

    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, width=None if tty else TOP_WIDTH, highlight=False)


def cmd_top(args: argparse.Namespace) -> int:
    """``lmshard top``: redraw every shard's stats until Ctrl-C (one frame with ``--once``)."""
    config = load_config(args.config)
    interval = args.interval if args.interval is not None else config.stats_interval
    if not interval > 0:
        raise ConfigError(f"--interval {interval!r}: expected seconds > 0")
    console = _console()
    if args.once:
        snap = collect(config).snapshot()
        console.print(render_top(snap))
        return 0
    from rich.live import Live

    board = StatsBoard(config)
    with StatsSubscriber(config) as sub, \
            Live(render_top(board.snapshot()), console=console, auto_refresh=False) as live:
        try:
            while True:
                sub.follow(board, interval)
                live.update(render_top(board.snapshot()), refresh=True)
        except KeyboardInterrupt:
            return 0


def add_parsers(sub: Any) -> None:
    """Register ``stats`` and ``top`` on the ``lmshard`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"lmshard config file (default: ${ENV_VAR}, "
                        "then ./config/lmshard.toml)")
    p = sub.add_parser(
        "stats", parents=[common], help="every shard's stats once, as a table or JSON",
        description="Ask the running monitor (monitor.endpoint) for every shard's stats; "
        "without one, subscribe to the shards for up to 1.5 stats intervals. Exit status 1 if "
        "a shard is stale or did not report.")
    p.add_argument("--json", action="store_true", help="print JSON (the monitor's /stats)")
    p.add_argument("--direct", action="store_true",
                   help="subscribe to the shards even if a monitor runs")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("top", parents=[common], help="live view of every shard's stats",
                       description="Subscribe to every shard's stats and show them, refreshed; "
                       "Ctrl-C quits.")
    p.add_argument("--once", action="store_true",
                   help="render one frame (after up to 1.5 intervals) and exit")
    p.add_argument("--interval", type=float, metavar="S",
                   help="seconds between refreshes (default: monitor.stats_interval)")
    p.set_defaults(func=cmd_top)


def main(argv: list[str] | None = None) -> int:
    """``python -m lmshard.ops.top stats|top ...``: the two commands without the full CLI."""
    ap = argparse.ArgumentParser(prog="lmshard", description="lmshard stats and top")
    add_parsers(ap.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
