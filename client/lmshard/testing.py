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

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmshard.errors import KeyEncodingError
from lmshard.keys import decode_index_value
from lmshard.store import Store
from lmshard.store import open as open_store
from lmshard.txn import BoundTable, ReadTxn

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
    tables = r._tables
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
    txn = r._txn
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
    txn = r._txn
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
                if verify and not store._closed:
                    problems += [f"{store.path}: {p}" for p in verify_indexes(store)]
            finally:
                store.close()
        if problems:
            pytest.fail(
                f"{len(problems)} index problem(s) after the test:\n  " + "\n  ".join(problems),
                pytrace=False,
            )

    @pytest.fixture
    def lmshard_purge() -> Callable[[Any], dict[str, int]]:
        """:func:`purge_all`: empty every table of a store, returning rows dropped per table."""
        return purge_all
