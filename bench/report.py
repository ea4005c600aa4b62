"""The suite's output: the tables on the terminal, results.json, the chart, performance.md.

Everything here reads the summary dict the suite builds (the same one saved as results.json),
so docs/performance.md can be regenerated from a saved results file:

    python -m bench.report docs/perf/results.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SYSTEMS = ("raw", "zlmdb", "redis", "lmshard")
LABELS = {"raw": "raw py-lmdb", "zlmdb": "zlmdb", "redis": "Redis", "lmshard": "lmshard"}
COLORS = {"raw": "#7f7f7f", "zlmdb": "#1f77b4", "redis": "#d62728", "lmshard": "#2ca02c"}

# (name, (workload, system), (workload, system), at least); system "floor" names a part of
# the floors (bench.floors.PARTS), measured in the same rounds as the workloads.
TARGETS: tuple[tuple[str, tuple[str, str], tuple[str, str], float], ...] = (
    ("local point gets vs raw py-lmdb", ("get", "lmshard"), ("get", "raw"), 0.8),
    ("local point gets vs zlmdb", ("get", "lmshard"), ("get", "zlmdb"), 1.5),
    ("local point gets vs Redis GET one-by-one", ("get", "lmshard"), ("get", "redis"), 40.0),
    ("local point gets vs Redis MGET of 1,000", ("get", "lmshard"), ("get_many", "redis"), 1.5),
    ("batched inserts, client.writer(), 1 client vs raw py-lmdb in-process",
     ("insert", "lmshard"), ("insert", "raw"), 0.7),
    ("batched inserts vs zlmdb", ("insert", "lmshard"), ("insert", "zlmdb"), 1.0),
    ("batched inserts vs Redis pipelined SET", ("insert", "lmshard"), ("insert", "redis"), 2.0),
    ("full scan vs raw py-lmdb", ("scan", "lmshard"), ("scan", "raw"), 0.7),
    ("8 concurrent acked-put clients vs 1", ("put8", "lmshard"), ("put1", "lmshard"), 4.0),
    ("acked single puts, 1 client vs raw py-lmdb", ("put1", "lmshard"), ("put1", "raw"), 0.75),
    ("acked single puts, 8 clients vs Redis", ("put8", "lmshard"), ("put8", "redis"), 0.7),
    ("acked single puts, 8 clients vs raw py-lmdb", ("put8", "lmshard"), ("put8", "raw"), 2.0),
    ("mixed 90% get / 10% put, 4 processes vs raw py-lmdb", ("mixed", "lmshard"),
     ("mixed", "raw"), 1.0),
    ("unique-index lookup vs raw py-lmdb", ("lookup", "lmshard"), ("lookup", "raw"), 0.8),
    ("get_many of 1,000 keys vs raw py-lmdb", ("get_many", "lmshard"), ("get_many", "raw"),
     0.8),
    ("time series append vs raw py-lmdb", ("ts_append", "lmshard"), ("ts_append", "raw"), 0.8),
    ("remote get, reader pool vs the bare pyzmq round trip", ("remote_get", "lmshard"),
     ("rtt_get", "floor"), 0.95),
    ("acked single puts, 1 client, fsync each second vs Redis everysec",
     ("put1_sec", "lmshard"), ("put1_sec", "redis"), 1.0),
    ("acked single puts, 8 clients, fsync each second vs Redis everysec",
     ("put8_sec", "lmshard"), ("put8_sec", "redis"), 1.0),
)

# (workload, its floor, the denominators of its targets in TARGETS): the floor is a part of
# bench.floors.PARTS, or "raw" (raw py-lmdb in-process, measured as a workload). In the
# issue's order.
FLOORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("put1", "served_sync", ("put1/raw",)),
    ("put8", "served8_sync", ("put8/redis", "put8/raw")),
    ("mixed", "raw", ("mixed/raw",)),
    ("insert", "raw", ("insert/raw",)),
    ("lookup", "raw", ("lookup/raw",)),
    ("get_many", "raw", ("get_many/raw",)),
    ("ts_append", "served_chunk_sync", ("ts_append/raw",)),
    ("remote_get", "rtt_get", ("rtt_get/floor",)),
    ("put1_sec", "served_nosync", ("put1_sec/redis",)),
    ("put8_sec", "served8_nosync", ("put8_sec/redis",)),
)
WITHIN = 0.9
"""A missed target counts as done when lmshard reaches this fraction of its floor."""


def rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _cell(w: dict[str, Any], system: str) -> dict[str, Any] | None:
    c = w["systems"].get(system)
    return c if c and "median" in c else None


def _part(summary: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A part of the floors (bench.floors.PARTS), or None when this run has none."""
    part: dict[str, Any] | None = (summary.get("floors") or {}).get("parts", {}).get(key)
    return part


def _median(summary: dict[str, Any], workload: str, system: str) -> float | None:
    if system == "floor":
        part = _part(summary, workload)
        return None if part is None else float(part["median"])
    w = summary["workloads"].get(workload)
    c = _cell(w, system) if w else None
    return None if c is None else float(c["median"])


def _rates(summary: dict[str, Any], workload: str, system: str) -> list[float]:
    if system == "floor":
        part = _part(summary, workload)
        return [] if part is None else list(part["rates"])
    w = summary["workloads"].get(workload)
    c = _cell(w, system) if w else None
    return [] if c is None else list(c["rates"])


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its ratio of medians, the per-round ratios, and PASS/MISS."""
    out = []
    for name, (wa, sa), (wb, sb), goal in TARGETS:
        a, b = _median(summary, wa, sa), _median(summary, wb, sb)
        entry: dict[str, Any] = {"target": name, "goal": goal, "numerator": f"{wa}/{sa}",
                                 "denominator": f"{wb}/{sb}"}
        if a is None or b is None or b == 0:
            entry.update(ratio=None, status="n/a")
        else:
            ra, rb = _rates(summary, wa, sa), _rates(summary, wb, sb)
            entry.update(ratio=round(a / b, 3), status="PASS" if a / b >= goal else "MISS",
                         per_round=[round(x / y, 3) for x, y in zip(ra, rb, strict=False) if y])
        out.append(entry)
    return out


# -- tables (lists of rows) both the terminal and the markdown print ---------------------------


def ops_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["workload", "unit", *(LABELS[s] for s in SYSTEMS), "vs raw", "vs zlmdb",
             "vs Redis"]]
    for w in summary["workloads"].values():
        lm = _cell(w, "lmshard")
        cells, ratios = [], []
        for s in SYSTEMS:
            c = w["systems"].get(s)
            cells.append(rate(c["median"]) if c and "median" in c else
                         ("skipped" if c else "-"))
        for s in ("raw", "zlmdb", "redis"):
            c = _cell(w, s)
            ratios.append(f"{lm['median'] / c['median']:.2f}x" if lm and c and c["median"]
                          else "-")
        rows.append([w["label"], w["unit"], *cells, *ratios])
    return rows


def latency_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["workload", "system", "median ops/s", "p50 us", "p99 us", "per", "server RSS MiB",
             "client RSS MiB"]]
    for w in summary["workloads"].values():
        for s in SYSTEMS:
            c = _cell(w, s)
            if c is None:
                continue
            rows.append([w["label"], LABELS[s], rate(c["median"]), _num(c["p50_us"]),
                         _num(c["p99_us"]), w["per"], _num(c["server_rss_mib"]),
                         _num(c["client_rss_mib"])])
    return rows


def target_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["target", "at least", "ratio", "per round", "result"]]
    for t in summary["targets"]:
        per = ", ".join(f"{x:.2f}" for x in t.get("per_round", []))
        rows.append([t["target"], f"{t['goal']:g}x",
                     "-" if t["ratio"] is None else f"{t['ratio']:.2f}x", per or "-",
                     t["status"]])
    return rows


def floor_part_rows(fl: dict[str, Any]) -> list[list[str]]:
    rows = [["floor part", "median ops/s", "p50 us", "p99 us", "p50 us per round"]]
    for key, p in fl["parts"].items():
        rows.append([f"{key}: {p['label']}", rate(p["median"]), _num(p["p50_us"]),
                     _num(p["p99_us"]), ", ".join(_num(x) for x in p["p50_us_per_round"])])
    return rows


def _floor(summary: dict[str, Any], workload: str, kind: str
           ) -> tuple[float | None, list[float], float | None, str]:
    """(floor rate, per round, floor p50 us, what the floor is) of a workload."""
    if kind == "raw":
        w = summary["workloads"].get(workload)
        c = _cell(w, "raw") if w else None
        what = "raw py-lmdb in-process (the target's ratio)"
        return (None, [], None, what) if c is None else (
            float(c["median"]), list(c["rates"]), c["p50_us"], what)
    from bench.floors import BY_KEY

    part = _part(summary, kind)
    what = f"{kind}: {BY_KEY[kind].label}"
    return (None, [], None, what) if part is None else (
        float(part["median"]), list(part["rates"]), part["p50_us"], what)


def _verdicts(summary: dict[str, Any], workload: str, denominators: tuple[str, ...]) -> str:
    """The workload's targets against these denominators, each as goal, baseline, ratio and
    result (e.g. ">= 0.7x Redis: 0.39x MISS")."""
    out = []
    for t in summary.get("targets", []):
        if t["numerator"] == f"{workload}/lmshard" and t["denominator"] in denominators:
            system = t["denominator"].split("/")[1]
            ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}x "
            out.append(f">= {t['goal']:g}x {'floor' if system == 'floor' else LABELS[system]}"
                       f": {ratio}{t['status']}")
    return "; ".join(out) or "-"


def floors(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each workload of the issue's targets that this run measured beside its floor:
    lmshard's median rate, the floor's, lmshard as a fraction of it (of medians, and per
    round) and whether that is within 10%."""
    out = []
    for workload, kind, denominators in FLOORS:
        w = summary["workloads"].get(workload)
        lm = _cell(w, "lmshard") if w else None
        floor, per, floor_p50, what = _floor(summary, workload, kind)
        if lm is None and floor is None:
            continue
        entry: dict[str, Any] = {
            "workload": workload, "label": w["label"] if w else workload,
            "targets": _verdicts(summary, workload, denominators), "floor_is": what,
            "lmshard": None if lm is None else lm["median"],
            "lmshard_p50_us": None if lm is None else lm["p50_us"], "floor": floor,
            "floor_p50_us": floor_p50, "fraction": None, "per_round": [], "within": None}
        if lm is not None and floor:
            entry["fraction"] = round(lm["median"] / floor, 3)
            entry["per_round"] = [round(a / b, 3) for a, b in zip(lm["rates"], per,
                                                                  strict=False) if b]
            entry["within"] = lm["median"] / floor >= WITHIN
        out.append(entry)
    return out


def floor_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["workload", "targets", "lmshard", "floor", "floor is", "of floor", "per round",
             "p50 us lmshard / floor", "within 10%"]]
    for f in floors(summary):
        p50 = (f"{_num(f['lmshard_p50_us'])} / {_num(f['floor_p50_us'])}"
               if f["lmshard_p50_us"] is not None or f["floor_p50_us"] is not None else "-")
        rows.append([f["label"], f["targets"], rate(f["lmshard"]), rate(f["floor"]),
                     f["floor_is"], "-" if f["fraction"] is None else f"{f['fraction']:.2f}x",
                     ", ".join(f"{x:.2f}" for x in f["per_round"]) or "-", p50,
                     "-" if f["within"] is None else "yes" if f["within"] else "no"])
    return rows


def scaling_rows(sc: dict[str, Any], what: str) -> list[list[str]]:
    rows = [["shards \\ clients", *(str(c) for c in sc["clients"])]]
    for s in sc["shards"]:
        by = sc[what].get(str(s), {})
        rows.append([str(s), *(rate(by.get(str(c))) for c in sc["clients"])])
    return rows


def commit_rows(sc: dict[str, Any]) -> list[list[str]]:
    rows = [["batch size", "lmshard p50 ms", "lmshard p99 ms", "lmshard rows/s",
             "raw p50 ms", "raw p99 ms", "raw rows/s"]]
    for c in sc["commit"]:
        lm, raw = c["lmshard"], c["raw"]
        rows.append([f"{c['batch']:,}", _num(lm["p50_ms"]), _num(lm["p99_ms"]),
                     rate(lm["rows_per_s"]), _num(raw["p50_ms"]), _num(raw["p99_ms"]),
                     rate(raw["rows_per_s"])])
    return rows


def commit_what(sc: dict[str, Any]) -> str:
    """What the commit latency table's lmshard columns measure, by how the run sent them."""
    if sc.get("commit_via") == "client.batch()":
        return ("each batch one acked commit through `client.batch()`, timed from the start "
                "of the batch to its ack (fsync included)")
    return ("batches through the pipelined `client.writer()` (up to 4 in flight), each timed "
            "as its hand-over, not to its ack")


def commit_caveat(sc: dict[str, Any]) -> list[str]:
    """Markdown lines warning that a results file predates acked-commit timing, or none."""
    if sc.get("commit_via") == "client.batch()":
        return []
    return ["**Re-measure:** the lmshard columns below come from a run that sent the batches "
            "through `client.writer()`, so they are how long a batch took to hand over (0.03 "
            "ms for one row, which no fsynced commit is), not send to ack. `bench/scaling.py` "
            "now times each batch as one acked commit through `client.batch()`; the next full "
            "run replaces these figures.", ""]


def change_ab_rows(ch: dict[str, Any]) -> list[list[str]]:
    rows = [["workload (1 client)", "log off", "log on", "on / off", "per round",
             "owner CPU us off", "owner CPU us on"]]
    for key, label, unit in (("insert", "batched inserts, client.writer()", "rows/s"),
                             ("put1", "acked single puts", "puts/s")):
        c = ch[key]
        rows.append([f"{label} [{unit}]", rate(c["off"]), rate(c["on"]), f"{c['ratio']:.2f}x",
                     ", ".join(f"{x:.2f}" for x in c["per_round"]), _num(c["off_cpu_us"]),
                     _num(c["on_cpu_us"])])
    return rows


def change_phase_rows(ch: dict[str, Any]) -> list[list[str]]:
    rows = [["paced load", "changes/s", "owner CPU us a change", "of it ZeroMQ I/O",
             "vs log on, no watcher", "owner cores", "lag from ack p50 / p99 / max ms",
             "lag from send p50 / p99 ms",
             "commit ms p50 / p99"]]
    base = ch["phases"]["log on, no watcher"]["cpu_us_per_change"]

    def ms(d: dict[str, Any] | None, keys: tuple[str, ...]) -> str:
        return "-" if d is None else " / ".join(_num(d[k]) for k in keys)

    for name, p in ch["phases"].items():
        rows.append([name, rate(p["written_per_s"]), _num(p["cpu_us_per_change"]),
                     _num(p["io_us_per_change"]) if "io_us_per_change" in p else "-",
                     f"{p['cpu_us_per_change'] / base:.2f}x", f"{p['owner_cores']:.2f}",
                     ms(p.get("from_ack_ms"), ("p50", "p99", "max")),
                     ms(p.get("from_send_ms"), ("p50", "p99")),
                     ms(p["commit_ms"], ("p50", "p99"))])
    return rows


def change_target_rows(ch: dict[str, Any]) -> list[list[str]]:
    rows = [["target", "goal", "measured", "per round", "result"]]
    for t in ch["targets"]:
        rows.append([t["target"], t["goal"], t["value"],
                     ", ".join(f"{x:.2f}" for x in t["per_round"]) or "-", t["status"]])
    return rows


def change_intro(ch: dict[str, Any]) -> str:
    return (f"two 4-shard services side by side (fsync on), `[changes] enabled` true and false; "
            f"{ch['rounds']} rounds alternating on/off; inserts {ch['rows']:,} rows, puts "
            f"{ch['puts']:,}, paced load {ch['rate']:,} changes/s for {ch['seconds']:g} s "
            f"({ch['batch']} rows a commit, one writer per shard); {ch['date']}" + (
                f"; other processes used {ch['load']['others_cores']:.2f} cores on average "
                f"(peak {ch['load']['others_peak_cores']:.2f})" if ch.get("load") else ""))


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def load_line(meta: dict[str, Any]) -> str:
    load, cores = meta["load"], meta["machine"]["cores"]
    return (f"other processes used {load['others_cores']:.2f} of {cores} cores on average "
            f"during the run (peak {load['others_peak_cores']:.2f}); the suite itself "
            f"{load['suite_cores']:.2f}; load average at start "
            f"{meta['machine']['load_at_start'][0]:.2f}")


def print_all(summary: dict[str, Any]) -> None:
    meta = summary["meta"]
    sz = meta["sizes"]
    print(f"\n{sz['rows']:,} records of ~100 B CBOR, {meta['rounds']} round(s); medians of "
          "ops/s; ratios are lmshard / baseline")
    if summary["workloads"]:
        print("\n" + text_table(ops_rows(summary)))
        print("\nLatency per operation (pooled over rounds) and peak RSS\n")
        print(text_table(latency_rows(summary)))
        skipped = [(w["label"], LABELS[s], c["skipped"]) for w in summary["workloads"].values()
                   for s, c in w["systems"].items() if "skipped" in c]
        for label, system, reason in skipped:
            print(f"skipped: {label} / {system}: {reason}")
        if any(t["status"] != "n/a" for t in summary["targets"]):
            print("\nTargets\n")
            print(text_table(target_rows(summary)))
    fl, beside = summary.get("floors"), floor_rows(summary)
    if fl or len(beside) > 1:
        print("\nFloors: what the design cannot go below, measured in the same rounds "
              "(bench.floors; raw py-lmdb for the in-process workloads)\n")
        if fl:
            print(text_table(floor_part_rows(fl)) + "\n")
        print(text_table(beside))
    sc = summary.get("scaling")
    if sc:
        print(f"\nScaling: batched writes, rows/s ({sc['rows']:,} new rows per cell, 1,000 "
              "per batch)\n")
        print(text_table(scaling_rows(sc, "writes")))
        print(f"\nScaling: local point gets, gets/s ({sc['gets']:,} per cell)\n")
        print(text_table(scaling_rows(sc, "gets_per_s")))
        print(f"\nCommit latency by batch size (1 shard, fsync on; {commit_what(sc)})\n")
        print(text_table(commit_rows(sc)))
    ch = summary.get("changes")
    if ch:
        print(f"\nChange log: {change_intro(ch)}\n")
        print(text_table(change_ab_rows(ch)))
        print()
        print(text_table(change_phase_rows(ch)))
        print()
        print(text_table(change_target_rows(ch)))
    print(f"\nMachine load: {load_line(meta)}" + (
        " -- LOADED: absolute numbers are noisy" if meta["load"]["loaded"] else ""))


# -- files -------------------------------------------------------------------------------------


def write(summary: dict[str, Any], out_dir: Path, md_path: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    written[0].write_text(json.dumps(summary, indent=1) + "\n")
    chart = chart_png(summary, out_dir / "ops.png")
    if chart is not None:
        written.append(chart)
    md_path.write_text(markdown(summary, chart, md_path.parent))
    written.append(md_path)
    return written


def chart_png(summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'lmshard[bench]')")
        return None
    workloads = [w for w in summary["workloads"].values()
                 if any(_cell(w, s) for s in SYSTEMS)]
    if not workloads:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.62 * len(workloads) + 1.6))
    height = 0.8 / len(SYSTEMS)
    for j, s in enumerate(SYSTEMS):
        ys, xs = [], []
        for i, w in enumerate(workloads):
            c = _cell(w, s)
            if c is not None:
                ys.append(i + (j - (len(SYSTEMS) - 1) / 2) * height)
                xs.append(c["median"])
        ax.barh(ys, xs, height=height, color=COLORS[s], label=LABELS[s])
    ax.set_yticks(range(len(workloads)))
    ax.set_yticklabels([f"{w['label']} [{w['unit']}]" for w in workloads], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("operations per second (log scale; median over rounds)")
    meta = summary["meta"]
    ax.set_title(f"lmshard and its peers, {meta['sizes']['rows']:,} records, "
                 f"{meta['machine']['cores']} cores, {meta['date']}", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _versions(meta: dict[str, Any]) -> str:
    p = meta["machine"]["packages"]
    parts = [p.get(f"{s}_version", "") for s in SYSTEMS]
    extra = [f"{n} {p[n]}" for n in ("cbor2", "msgpack", "pyzmq", "numpy") if p.get(n) != "-"]
    return "; ".join(x for x in parts + extra if x)


def floors_markdown(summary: dict[str, Any]) -> list[str]:
    """The Floors section: the parts measured, then each target's workload beside its floor."""
    fl = summary.get("floors")
    return [
        "## Floors",
        "",
        "What the design cannot go below, measured in every round right before the acked "
        "puts, in fresh worker processes as the workloads (`bench/floors.py`; `lmshard bench "
        "--only floors` runs it alone, and it runs with the acked puts and remote_get): bare "
        "round trips between a client and an echo server process (no lmshard), pyzmq "
        "DEALER/ROUTER over ipc and a plain unix stream socket (the way a same-host single put "
        "reaches its owner, `shard.unix_socket`), and in-process raw py-lmdb write "
        "transactions of one row and a client record in two named databases, without and with "
        "a change-log record in a third (as an owner commits by default), in an environment "
        "holding one shard's share of the records, with `sync=True` (an fsync per commit) and "
        "`sync=False`; the unix round trip to a server that makes that commit before "
        "each answer; and 8 clients spreading their puts over 4 such servers that commit "
        "every request waiting as one group.",
        "",
        *([md_table(floor_part_rows(fl)), ""] if fl else ["(Not measured in this run.)", ""]),
        "An acked single put is at least a round trip to its owner plus one commit: its floor "
        "is the round trip to the smallest owner there is, a unix stream server that makes "
        "the commit with its change-log record before each answer (`served_sync`, with "
        "fsync, for the 1-client put; `served_nosync` for the fsync-each-second one): a "
        "round trip and a commit one after the other, with the wake-ups an fsync's wait "
        "costs, which neither part measured alone has (their p50s' sum is in the parts "
        "table's derived rows of results.json); the 8-client puts' floor is those 4 "
        "group-committing servers under 8 clients (`served8_sync`, `served8_nosync`). A "
        "time series append goes to its shard's owner too: its floor is the unix round trip "
        "of its chunk to such a server, which commits the chunk, the series head and their "
        "change-log record (`served_chunk_sync`; the target's raw py-lmdb append writes the "
        "chunk alone, in-process). A remote get "
        "through the reader pool is at least a pyzmq round trip (the pool speaks ZeroMQ). "
        "The other in-process workloads' floor is raw py-lmdb, measured as a workload, so "
        "their fraction is the target's own ratio. lmshard's rate is operations over the "
        "wall-clock span, so its tail counts against it; its p50 beside the floor's shows the "
        "typical operation. A missed target counts as done when lmshard reaches "
        f"{WITHIN:.0%} of its floor.",
        "",
        md_table(floor_rows(summary)),
        "",
    ]


def markdown(summary: dict[str, Any], chart: Path | None, md_dir: Path) -> str:
    meta, m = summary["meta"], summary["meta"]["machine"]
    sz = meta["sizes"]
    loaded = meta["load"]["loaded"]
    lines: list[str] = [
        "# Performance",
        "",
        "<!-- Generated by `make bench` (bench/report.py) from docs/perf/results.json; "
        "edits here are overwritten. -->",
        "",
        "lmshard measured side by side with what its users would pick instead, in one run on "
        "one machine: raw py-lmdb in-process (the ceiling: no table layer, no daemon), zlmdb's "
        "ORM in-process, and Redis through redis-py. Ratios from one run are what count; "
        "absolute numbers move with the machine.",
        "",
    ]
    if loaded:
        lines += [
            f"> **Measured on a loaded machine.** {load_line(meta).capitalize()}. The absolute "
            "numbers "
            "below are lower and noisier than on an idle machine; the systems took turns "
            "within each round, so the ratios suffer less, but they carry that noise too "
            "(see the per-round ratios of the targets).",
            "",
        ]
    lines += [
        "## How to run",
        "",
        "```",
        f"make bench                       # full run (this one: "
        f"{meta.get('wall_seconds', 0) / 60:.0f} minutes); rewrites this page",
        "make bench BENCH_ARGS=--quick    # the same, quick",
        "lmshard bench --quick            # 20,000 records, one round: checks that all runs",
        "lmshard bench --only get,insert  # some workloads (or systems, or `scaling`)",
        "python -m bench.suite --list     # the workload names",
        "lmshard bench --only put1,put1_sec,remote_get,floors   # the single puts and "
        "remote gets beside their floors",
        "```",
        "",
        "`make bench` installs the `bench` extra (zlmdb, redis-py, matplotlib) and, as root, "
        "redis-server with apt when it is missing. Without redis-server the suite says so and "
        "leaves Redis out; without zlmdb likewise.",
        "",
        "## Method",
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, data on {m['filesystem']}; Python {m['python']}. {meta['date']}.",
        f"- Versions: {_versions(meta)}.",
        f"- Data: {sz['rows']:,} records of about 100 bytes of CBOR (7 fields), uint64 keys; "
        f"{sz['series']:,} event series of {sz['per_series']} rows under (str, uint64) keys; "
        f"{sz['users']:,} users with a unique email index; {sz['ts_series']} time series of "
        f"{sz['ts_points']:,} float64 points.",
        f"- Rounds: {meta['rounds']}. Each round starts every system afresh (a new "
        "directory, its own server processes), then runs each workload on each system in "
        "turn, so the numbers a ratio compares are taken seconds apart; the order of the "
        "systems reverses from one round to the next. Tables show the median over rounds.",
        "- What is timed: each workload runs in fresh worker processes that open, connect "
        "and warm up first, untimed, and are then released together; ops/s is items over the "
        "wall-clock span from release to the last worker's end. Rows to write are built "
        "before the clock starts; decoding every value read is inside it.",
        "- Latency: slow operations (anything crossing a process, fsyncing or moving a "
        "batch) are each timed; fast in-process ones (point gets, lookups) one in 16. p50 "
        "and p99 pool the samples of all rounds and workers; a scan's latency is per 1,000 "
        "rows. A clock read (~0.1 us here) is inside each sample.",
        "- Memory: peak RSS (VmHWM) of the client worker (the largest, if several) and of the "
        "servers (lmshard's shard owners or reader pool, summed; redis-server), reset before "
        "each workload. LMDB readers count the mapped file pages they touch. Workers are "
        "forked from a forkserver that has the common modules loaded (about 30 MiB); the "
        "insert workers also hold the rows they are about to write.",
        "- lmshard: 4 shard owner processes (`durability.sync = true`, map 1 GiB), clients "
        "in their own processes with local reads (each shard opened read-only in-process); "
        "remote gets go through the reader pool (2 reader processes) or the owner. Batched "
        "inserts go through `client.writer()` (batches of 1,000 ops per shard, up to 4 in "
        "flight per shard, as Redis pipelines); their latency is the time a chunk of 1,000 rows "
        "took to hand over, and the final flush (the last acks) is added to the last chunk.",
        "- raw py-lmdb: one environment, a named database per table, `sync=True`, a read "
        "transaction per point get, per lookup and per get_many call; a hand-kept index "
        "database for the unique lookups.",
        "- zlmdb: `MapOidCbor` tables with an attached `MapStringOid` unique index, "
        "`MapStringTimestampCbor` for events and time series chunks (zlmdb has no "
        "(str, uint64) -> CBOR map), `sync=True`, a transaction per get as for raw.",
        "- Redis: the suite's own redis-server on a unix socket. Bulk inserts run without "
        "persistence (a pipeline of 1,000 SETs); acked puts, the mixed fleet and time series "
        "appends with `appendonly yes` + `appendfsync always`, so an acknowledged write is on "
        "disk as with the others. Gets are one GET per key; get_many is MGET of 1,000; the "
        "full scan is SCAN + MGET (unordered); a series is a sorted set; a unique lookup is "
        "two GETs (email -> id, id -> row); one-command-per-op workloads run "
        f"{sz['one_by_one']:,} ops.",
        "- Acked puts with an fsync each second (Redis and lmshard only): lmshard's own "
        "4-owner service with `durability.flush_interval = 1`, Redis switched to "
        "`appendonly yes` + `appendfsync everysec`. In both an ack means the write reached the "
        "OS, and an fsync a second puts it on disk: a crash of the server loses nothing, an OS "
        "crash about the last second.",
        "- Floors: bare pyzmq and unix socket round trips and raw py-lmdb commits of a row "
        "and a client record (with and without a change-log record), measured in each round "
        "beside the workloads; see Floors below.",
        "- Time series: lmshard's `TimeSeries` (1,024-point chunks; an append that fits in "
        "the tail chunk's room goes into it, a larger one, as here, starts a new chunk; "
        "each compare-and-sets the series head); the peers store each append of 1,000 "
        "points as one chunk of NumPy bytes keyed by (series, first timestamp) and find the "
        f"chunks of a range the same way. A range query reads {sz['ts_window']:,} points.",
        "",
        "## Results",
        "",
        "Median operations per second; the ratios are lmshard / baseline.",
        "",
        md_table(ops_rows(summary)),
        "",
    ]
    if chart is not None:
        rel = chart.relative_to(md_dir) if chart.is_relative_to(md_dir) else chart
        lines += [f"![ops/s per workload and system]({rel.as_posix()})", ""]
    skipped = [(w["label"], LABELS[s], c["skipped"]) for w in summary["workloads"].values()
               for s, c in w["systems"].items() if "skipped" in c]
    if skipped:
        lines += ["Skipped in this run:", ""]
        lines += [f"- {label} / {system}: {reason}" for label, system, reason in skipped]
        lines.append("")
    lines += ["## Targets", "", md_table(target_rows(summary)), ""]
    if summary.get("floors") or len(floor_rows(summary)) > 1:
        lines += floors_markdown(summary)
    lines += ["## Latency and memory", "", md_table(latency_rows(summary)), ""]
    sc = summary.get("scaling")
    if sc:
        lines += [
            "## Scaling",
            "",
            f"lmshard with 1, 2 and 4 shard owners (fsync on) and 1 to 8 client processes on "
            f"{m['cores']} cores. Batched writes: {sc['rows']:,} new rows per cell, split "
            "between the clients, each through `client.writer()` (batches of 1,000 ops per "
            "shard, up to 4 in flight per shard, as the batched inserts above); rows/s:",
            "",
            md_table(scaling_rows(sc, "writes")),
            "",
            f"Local point gets: {sc['gets']:,} per cell split between the clients; gets/s:",
            "",
            md_table(scaling_rows(sc, "gets_per_s")),
            "",
            f"Commit latency by batch size: one client, one shard, {commit_what(sc)}; raw "
            "py-lmdb committing the same batches in-process with `sync=True` beside it (the "
            "rows encoded inside the clock on both sides):",
            "",
            *commit_caveat(sc),
            md_table(commit_rows(sc)),
            "",
        ]
    ch = summary.get("changes")
    if ch:
        lines += [
            "## Change log",
            "",
            "What writing the change log costs and how soon a watcher has a change "
            "(`bench/change_log.py`; `lmshard bench --only changes` runs it alone, and the "
            "log-off baseline with it): "
            f"{change_intro(ch)}. Medians over the rounds; per round, the paired ratio of that "
            "round (the lag target: that round's p99).",
            "",
            md_table(change_ab_rows(ch)),
            "",
            "The paced load: one writer process per shard puts a batch every "
            f"{ch['batch'] / (ch['rate'] / 4) * 1000:g} ms with `client.batch()`, each row's "
            "value carrying `time.monotonic()` at send; a watcher's lag is the "
            "`time.monotonic()` at which `Watch.get` returned the change less the moment the "
            "writer had the commit's ack (from send: less the moment it sent, so the commit "
            "and its fsync are in it). Owner CPU is every owner thread's (`/proc/PID/task/*/"
            "schedstat`) from the workers' release to the last one's end, per change written. "
            "Lags pool every watcher and round.",
            "",
            md_table(change_phase_rows(ch)),
            "",
            md_table(change_target_rows(ch)),
            "",
        ]
    tt = summary.get("ttl")
    if tt:
        from bench import ttl

        lines += ttl.markdown(tt, f"{meta['date']}; {load_line(meta)}")
    rp = summary.get("replicas")
    if rp:
        from bench import replicas

        lines += replicas.markdown(rp, f"{meta['date']}; {load_line(meta)}")
    rs = summary.get("reshard")
    if rs:
        from bench import reshard

        lines += reshard.markdown(rs, f"{meta['date']}; {load_line(meta)}")
    notes = md_dir / "perf" / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += [
        "## Raw results",
        "",
        "[perf/results.json](perf/results.json) holds every round's rate, the latency "
        "percentiles, the sizes, versions and the machine's load during the run. "
        f"This run took {meta['wall_seconds'] / 60:.1f} minutes.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    default = Path(__file__).resolve().parent.parent / "docs" / "perf" / "results.json"
    src = Path(args[0]) if args else default
    summary = json.loads(src.read_text())
    docs = src.parent.parent
    md = docs / "performance.md"
    chart = src.parent / "ops.png"
    md.write_text(markdown(summary, chart if chart.exists() else None, docs))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
