"""Embedded lmshard against raw py-lmdb + cbor2, side by side in one run.

    python bench/embedded.py [--rows 200000] [--rounds 3]

Same data, same machine, systems alternating within each round; prints medians and the ratio
lmshard / raw for each workload. Raw py-lmdb is the ceiling: one named database, 8-byte
big-endian keys, cbor2 values, and a hand-kept unique index database for the lookup workload.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import lmdb

import lmshard

USERS_ID = "0b6f3f1c-96a5-4f0e-9d5e-1a2b3c4d5e6f"


def record(i: int) -> dict[str, object]:
    return {"id": i, "name": f"user-{i:08d}", "email": f"u{i}@example.com", "age": i % 90,
            "score": i * 0.5, "city": "Berlin", "tags": ["alpha", "beta", "gamma"]}


class Raw:
    name = "raw py-lmdb"

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), map_size=1 << 30, max_dbs=8)
        self.db = self.env.open_db(b"rows")
        self.ix = self.env.open_db(b"by_email")

    def insert(self, rows: list[dict[str, object]], batch: int, indexed: bool) -> None:
        dumps = cbor2.dumps
        for s in range(0, len(rows), batch):
            with self.env.begin(write=True) as txn:
                for r in rows[s:s + batch]:
                    k = r["id"].to_bytes(8, "big")  # type: ignore[attr-defined]
                    txn.put(k, dumps(r), db=self.db)
                    if indexed:
                        txn.put(str(r["email"]).encode(), k, db=self.ix)

    def get_each(self, keys: list[int]) -> None:
        loads, begin, db = cbor2.loads, self.env.begin, self.db
        for k in keys:
            txn = begin(db=db)
            loads(txn.get(k.to_bytes(8, "big")))
            txn.abort()

    def get_in_txn(self, keys: list[int]) -> None:
        loads = cbor2.loads
        with self.env.begin(db=self.db) as txn:
            get = txn.get
            for k in keys:
                loads(get(k.to_bytes(8, "big")))

    def scan(self) -> int:
        loads, n = cbor2.loads, 0
        with self.env.begin(db=self.db) as txn:
            for k, v in txn.cursor():
                int.from_bytes(k, "big")
                loads(v)
                n += 1
        return n

    def lookup(self, emails: list[str]) -> None:
        loads = cbor2.loads
        with self.env.begin() as txn:
            for e in emails:
                k = txn.get(e.encode(), db=self.ix)
                loads(txn.get(k, db=self.db))

    def close(self) -> None:
        self.env.close()


class Embedded:
    name = "lmshard embedded"

    def __init__(self, path: Path) -> None:
        self.schema = lmshard.Schema("bench")
        self.users = self.schema.table("users", table_id=USERS_ID, key="uint64", value="cbor")
        self.indexed = False
        self.store = lmshard.open(path, self.schema, map_size=1 << 30)

    def add_index(self, path: Path) -> None:
        self.store.close()
        self.schema = lmshard.Schema("bench")
        self.users = self.schema.table("users", table_id=USERS_ID, key="uint64", value="cbor")
        self.users.index("by_email", lambda v: v["email"], unique=True)
        self.store = lmshard.open(path, self.schema, map_size=1 << 30)

    def insert(self, rows: list[dict[str, object]], batch: int, indexed: bool) -> None:
        users = self.users
        for s in range(0, len(rows), batch):
            with self.store.batch() as b:
                put = b.put
                for r in rows[s:s + batch]:
                    put(users, r["id"], r)

    def get_each(self, keys: list[int]) -> None:
        get, users = self.store.get, self.users
        for k in keys:
            get(users, k)

    def get_in_txn(self, keys: list[int]) -> None:
        with self.store.read() as r:
            get, users = r.get, self.users
            for k in keys:
                get(users, k)

    def scan(self) -> int:
        n = 0
        for _ in self.store.scan(self.users):
            n += 1
        return n

    def lookup(self, emails: list[str]) -> None:
        with self.store.read() as r:
            lookup, users = r.lookup, self.users
            for e in emails:
                lookup(users, "by_email", e)

    def close(self) -> None:
        self.store.close()


def run_round(
    sysm: Raw | Embedded, name: str, note: Callable[[str, str, float], None],
    rows: list[dict[str, object]], keys: list[int], emails: list[str], tmp: Path,
) -> None:
    n = len(rows)
    note(name, "insert, 1,000 per txn", timed(lambda: sysm.insert(rows, 1000, False), n))
    note(name, "point get, txn per get", timed(lambda: sysm.get_each(keys), n))
    note(name, "point get, one read txn", timed(lambda: sysm.get_in_txn(keys), n))
    note(name, "full scan", timed(sysm.scan, n))
    if isinstance(sysm, Embedded):
        sysm.add_index(tmp / "db")  # builds the unique index over existing rows
        sysm.store.purge(sysm.users)
    else:
        with sysm.env.begin(write=True) as txn:
            txn.drop(sysm.db, delete=False)
    note(name, "insert with unique index", timed(lambda: sysm.insert(rows, 1000, True), n))
    note(name, "unique index lookup", timed(lambda: sysm.lookup(emails), len(emails)))


def timed(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.rows
    rows = [record(i) for i in range(n)]
    rng = random.Random(7)
    keys = [rng.randrange(n) for _ in range(n)]
    emails = [f"u{rng.randrange(n)}@example.com" for _ in range(n // 4)]
    results: dict[str, dict[str, list[float]]] = {}

    def note(system: str, workload: str, rate: float) -> None:
        results.setdefault(workload, {}).setdefault(system, []).append(rate)

    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds} ...", flush=True)
        order = [Raw, Embedded] if rnd % 2 == 0 else [Embedded, Raw]
        for cls in order:
            tmp = Path(tempfile.mkdtemp(prefix="lmshard-bench-"))
            try:
                sysm = cls(tmp / "db")
                run_round(sysm, cls.name, note, rows, keys, emails, tmp)
                sysm.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{n:,} records of ~{len(cbor2.dumps(rows[0]))} B CBOR, uint64 keys, "
          f"{args.rounds} rounds, median ops/s (lmdb {lmdb.__version__}, LMDB "
          f"{'.'.join(map(str, lmdb.version()))})\n")
    print(f"{'workload':<28} {'raw py-lmdb':>14} {'lmshard':>14} {'ratio':>7}")
    for workload, by in results.items():
        raw = statistics.median(by[Raw.name])
        emb = statistics.median(by[Embedded.name])
        print(f"{workload:<28} {raw:>14,.0f} {emb:>14,.0f} {emb / raw:>6.2f}x")


if __name__ == "__main__":
    main()
