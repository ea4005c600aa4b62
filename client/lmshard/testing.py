"""Testing with lmshard: temporary stores, purging tables, and checking indexes against rows.

As a pytest plugin (``-p lmshard.testing``, or the ``lmshard`` entry point) it provides:

``lmshard_store_factory``
    ``make(schema, **options)`` opens a new embedded store in the test's ``tmp_path``; after the
    test it checks every store still open with :func:`verify_indexes` (an inconsistency fails
    the test) and closes it.
``lmshard_purge``
    :func:`purge_all`: empty every table of a store, e.g. between phases of one test.

:func:`verify_indexes` and :func:`assert_consistent` work without pytest too (backup checks use
the first); only the fixtures need it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmshard.bound_tables import BoundTable
from lmshard.errors import KeyEncodingError
from lmshard.index_values import decode_index_value
from lmshard.store import Store
from lmshard.store import open as open_store
from lmshard.txn import ReadTxn

MAX_PROBLEMS = 100
"""verify_indexes() stops after this many problems: past that, more detail does not help."""


def purge_all(store: Any) -> dict[str, int]:
    """Empty every table of ``store`` in one batch; returns rows dropped per table."""
    with store.batch() as b:
        return {t.name: b.purge(t) for t in store.schema.tables.values()}


def verify_indexes(source: Store | ReadTxn, *, max_problems: int = MAX_PROBLEMS) -> list[str]:
    """Check every index of every table against the rows, in one snapshot.

    Reports rows missing from an index (or held there by another row), index entries pointing
    to missing rows, entries whose value is not what the index function gives for the row,
    and rows an index function or the codec cannot read. An empty list means consistent.
    ``source`` is a store or an open read (or write) transaction.
    """
    if isinstance(source, ReadTxn):
        return _verify(source, max_problems)
    with source.read() as r:
        return _verify(r, max_problems)


def assert_consistent(source: Store | ReadTxn) -> None:
    """AssertionError listing the problems :func:`verify_indexes` finds, if any."""
    problems = verify_indexes(source)
    if problems:
        raise AssertionError(
            f"{len(problems)} index problem(s):\n  " + "\n  ".join(problems)
        )


class _Problems(list[str]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def add(self, text: str) -> bool:
        """Record a problem; False once the limit is reached (stop looking)."""
        if len(self) >= self.limit:
            if len(self) == self.limit:
                self.append(f"... stopped after {self.limit} problems")
            return False
        self.append(text)
        return True


def _verify(r: ReadTxn, limit: int) -> list[str]:
    problems = _Problems(limit)
    tables = r.tables
    for table in tables.schema.tables.values():
        b = tables[table]
        if b.indexes and not (_rows_in_indexes(r, b, problems) and _entries_match(r, b, problems)):
            break
    return list(problems)


def _show_key(b: BoundTable, kb: bytes | memoryview) -> str:
    try:
        return repr(b.table.key.to_json(b.kdec(bytes(kb))))
    except Exception:
        return f"0x{bytes(kb).hex()}"


def _show_ivb(ivb: bytes | memoryview) -> str:
    try:
        return repr(decode_index_value(bytes(ivb)))
    except Exception:
        return f"0x{bytes(ivb).hex()}"


def _rows_in_indexes(r: ReadTxn, b: BoundTable, problems: _Problems) -> bool:
    txn = r.txn
    for kb, vb in txn.cursor(db=b.db).iternext():
        try:
            value = b.loads(vb)
        except Exception as exc:
            if not problems.add(f"{b.name}: row {_show_key(b, kb)} cannot be decoded: {exc}"):
                return False
            continue
        for bi in b.indexes:
            where = f"{b.name}.{bi.name}"
            try:
                ivb = bi.encode(value)
            except KeyEncodingError as exc:
                if not problems.add(f"{where}: row {_show_key(b, kb)}: {exc.message}"):
                    return False
                continue
            if ivb is None:  # a nullable index leaves this row out
                continue
            if bi.unique:
                holder = txn.get(ivb, db=bi.db)
                if holder == kb:
                    continue
                text = f"{where}: row {_show_key(b, kb)} with value {_show_ivb(ivb)} is " + (
                    "missing from the index" if holder is None
                    else f"not in the index: the entry points to row {_show_key(b, holder)}"
                )
            else:
                if txn.cursor(db=bi.db).set_key_dup(ivb, kb):
                    continue
                text = (
                    f"{where}: row {_show_key(b, kb)} with value {_show_ivb(ivb)} is missing "
                    "from the index"
                )
            if not problems.add(text):
                return False
    return True


def _entries_match(r: ReadTxn, b: BoundTable, problems: _Problems) -> bool:
    txn = r.txn
    for bi in b.indexes:
        where = f"{b.name}.{bi.name}"
        for ivb, kb in txn.cursor(db=bi.db).iternext():
            data = txn.get(kb, db=b.db)
            if data is None:
                text = (
                    f"{where}: entry {_show_ivb(ivb)} points to row {_show_key(b, kb)}, "
                    "which does not exist"
                )
            else:
                try:
                    expected = bi.encode(b.loads(data))
                except Exception:
                    continue  # reported by the row pass
                if expected == ivb:
                    continue
                text = f"{where}: entry {_show_ivb(ivb)} points to row {_show_key(b, kb)}, " + (
                    "which the index leaves out (its value is None)" if expected is None
                    else f"whose index value is {_show_ivb(expected)}"
                )
            if not problems.add(text):
                return False
    return True


class LocalService:
    """Real shard owner processes for tests, on ipc sockets in a short temporary run directory.

    ``schema`` is the "module:attr" the owners import (``python_path`` is prepended to their
    ``sys.path``); other keyword arguments are config settings (see ``make_config``). Start,
    kill, restart and stop owners; ``client()`` connects to them.
    """

    def __init__(self, base: str | os.PathLike[str], schema: str, *, shards: int = 2,
                 python_path: Sequence[str] = (), **settings: Any) -> None:
        from lmshard.config import load_config, make_config

        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        # ipc paths must stay under the unix socket limit: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="lms-"))
        settings.setdefault("timeout_ms", 3000)
        settings.setdefault("retries", 4)
        settings.setdefault("sync", False)
        # No reader pool unless asked: with readers.count > 0, clients without local files
        # read through the pool, and this service starts shard owners only.
        settings.setdefault("readers", 0)
        cfg = make_config(base_dir=self.base, shards=shards, schema=schema,
                          python_path=[str(p) for p in python_path],
                          data_dir=str(self.base / "data"), run_dir=str(self.run_dir), **settings)
        self.config_path = self.base / "lmshard.toml"
        self.config_path.write_text(cfg.to_toml())
        self.config = load_config(self.config_path)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}

    def start(self, shard: int | None = None, wait: bool = True) -> None:
        """Start one owner, or all of them; wait until each answers a ping."""
        shards = range(self.config.shards) if shard is None else [shard]
        for s in shards:
            log = self.logs[s] = self.base / f"owner-{s:02d}.log"
            with open(log, "ab") as out:
                self.procs[s] = subprocess.Popen(
                    [sys.executable, "-m", "lmshardd.main", "-c", str(self.config_path),
                     "owner", "--shard", str(s)],
                    stdout=out, stderr=subprocess.STDOUT,
                )
        if wait:
            for s in shards:
                self.wait_ready(s)

    def wait_ready(self, shard: int, timeout: float = 30.0) -> None:
        from lmshard.client import connect
        from lmshard.errors import ShardUnavailable

        deadline = time.monotonic() + timeout
        with connect(self.config, timeout_ms=200, retries=0) as c:
            while True:
                proc = self.procs[shard]
                if proc.poll() is not None:
                    raise RuntimeError(f"owner {shard} exited {proc.returncode}: "
                                       f"{self.logs[shard].read_text()[-2000:]}")
                try:
                    c.ping(shard)
                    return
                except ShardUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def kill(self, shard: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[shard]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def pid(self, shard: int) -> int:
        return self.procs[shard].pid

    def client(self, **options: Any) -> Any:
        from lmshard.client import connect

        return connect(self.config, **options)

    def stop(self) -> None:
        """SIGTERM every owner (SIGKILL after 20 s) and remove the run directory."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalService:
        try:
            self.start()
        except BaseException:
            self.stop()  # never leave owners running when they could not all come up
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


try:
    import pytest
except ImportError:  # the helpers above work without pytest; the fixtures need it
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def lmshard_store_factory(tmp_path: Path) -> Iterator[Callable[..., Store]]:
        """``make(schema, *, verify=True, **options)``: a new store in ``tmp_path``.

        Options go to ``lmshard.open``; ``sync`` defaults to False (a test's store need not
        survive a power cut, and fsyncs slow tests down). After the test every store still open
        is checked with verify_indexes() (unless ``verify=False``) and closed.
        """
        made: list[tuple[Store, bool]] = []

        def make(schema: Any, *, verify: bool = True, **options: Any) -> Store:
            options.setdefault("sync", False)
            store = open_store(tmp_path / f"lmshard-store-{len(made)}", schema, **options)
            made.append((store, verify))
            return store

        yield make
        problems: list[str] = []
        for store, verify in made:
            try:
                if verify and not store.closed:
                    problems += [f"{store.path}: {p}" for p in verify_indexes(store)]
            finally:
                store.close()
        if problems:
            pytest.fail(
                f"{len(problems)} index problem(s) after the test:\n  " + "\n  ".join(problems),
                pytrace=False,
            )

    @pytest.fixture
    def lmshard_service_factory(tmp_path: Path) -> Iterator[Callable[..., LocalService]]:
        """``make(schema="module:attr", *, shards=2, python_path=(), **settings)``: real shard
        owners in ``tmp_path``, started; stopped after the test."""
        made: list[LocalService] = []

        def make(schema: str, **options: Any) -> LocalService:
            svc = LocalService(tmp_path / f"lmshard-service-{len(made)}", schema, **options)
            made.append(svc)
            svc.start()
            return svc

        yield make
        for svc in made:
            svc.stop()

    @pytest.fixture
    def lmshard_purge() -> Callable[[Any], dict[str, int]]:
        """:func:`purge_all`: empty every table of a store, returning rows dropped per table."""
        return purge_all
