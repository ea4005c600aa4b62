"""Where an lmshard workload spends its time: CPU per op of client and owners, and py-spy.

    python -m bench.profile insert|get|scan|put [--shards 4] [--rows 200000] [--spy]

Starts shard owners on ``bench.schema`` (fsync on), runs the workload in this process and
prints wall time, this process's CPU time and the owners' CPU time per operation, beside raw
py-lmdb doing the same in-process. With ``--spy`` (py-spy installed: pip install py-spy) it
also samples the owners and prints the lines that use the most of their time; profile the
client side with ``py-spy record -- python -m bench.profile ...``.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import lmdb

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lmshard  # noqa: E402
from bench.schema import record  # noqa: E402
from lmshard.local_service import LocalService  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(label: str, fn: Callable[[], object], ops: int, owners: list[int]) -> None:
    o0, c0, w0 = sum(map(cpu_seconds, owners)), time.process_time(), time.perf_counter()
    fn()
    w = time.perf_counter() - w0
    c = time.process_time() - c0
    o = sum(map(cpu_seconds, owners)) - o0
    print(f"{label:<24} {ops / w:>10,.0f}/s  wall {w / ops * 1e6:8.2f} us  this process's CPU "
          f"{c / ops * 1e6:8.2f} us  owners' CPU {o / ops * 1e6:8.2f} us", flush=True)


def top_lines(raw_file: Path, k: int = 15) -> None:
    """The lines with the most samples of their own in py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    for frame, n in own.most_common(k):
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=("insert", "get", "scan", "put"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--spy", action="store_true", help="sample the owners with py-spy")
    args = ap.parse_args()
    n = args.rows
    base = Path(tempfile.mkdtemp(prefix="lmshard-profile-"))
    svc = LocalService(base / "svc", "bench.schema:schema", shards=args.shards,
                       python_path=[str(ROOT)], sync=True, map_size="1GiB", readers=0,
                       timeout_ms=30000, retries=2)
    svc.start()
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        owners = [p.pid for p in svc.procs.values()]
        c = lmshard.connect(svc.config_path)
        env = lmdb.open(str(base / "raw"), map_size=1 << 31, max_dbs=4, sync=True)
        db = env.open_db(b"records")
        rows = [record(i) for i in range(n)]
        keys = [random.randrange(n) for _ in range(n)]
        dumps, loads = cbor2.dumps, cbor2.loads

        def lm_insert() -> None:
            for s in range(0, n, 1000):
                with c.batch() as b:
                    for r in rows[s:s + 1000]:
                        b.put("records", r["id"], r)

        def raw_insert() -> None:
            for s in range(0, n, 1000):
                with env.begin(write=True, db=db) as txn:
                    for r in rows[s:s + 1000]:
                        txn.put(r["id"].to_bytes(8, "big"), dumps(r))

        if args.workload != "insert":
            lm_insert()
            raw_insert()
        if args.spy:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            for s, pid in enumerate(owners):
                out = base / f"owner-{s}.txt"
                spies.append((subprocess.Popen(
                    [spy, "record", "-p", str(pid), "-r", "400", "--format", "raw", "-o",
                     str(out), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
            time.sleep(1.0)
        if args.workload == "insert":
            measure("lmshard batched insert", lm_insert, n, owners)
            measure("raw batched insert", raw_insert, n, owners)
        elif args.workload == "get":
            get = c.get
            for k in keys[:100]:
                get("records", k)

            def raw_gets() -> None:
                for k in keys:
                    txn = env.begin(db=db)
                    loads(txn.get(k.to_bytes(8, "big")))
                    txn.abort()

            measure("lmshard point get", lambda: [get("records", k) for k in keys], n, owners)
            measure("raw point get", raw_gets, n, owners)
        elif args.workload == "scan":
            def raw_scan() -> None:
                with env.begin(db=db) as txn:
                    for k, v in txn.cursor():
                        int.from_bytes(k, "big")
                        loads(v)

            measure("lmshard full scan", lambda: sum(1 for _ in c.scan("records")), n, owners)
            measure("raw full scan", raw_scan, n, owners)
        else:
            m = 2000

            def raw_puts() -> None:
                for r in rows[:m]:
                    with env.begin(write=True, db=db) as txn:
                        txn.put((10**9 + r["id"]).to_bytes(8, "big"), dumps(r))

            measure("lmshard acked put", lambda: [c.put("records", 10**9 + r["id"], r)
                                                  for r in rows[:m]], m, owners)
            measure("raw put, txn each", raw_puts, m, owners)
        c.close()
        env.close()
    finally:
        for proc, _ in spies:
            proc.send_signal(2)
            proc.wait(timeout=30)
        svc.stop()
    for s, (_, out) in enumerate(spies):
        if out.exists():
            print(f"\nowner {s}: lines with the most samples of their own")
            top_lines(out)
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
