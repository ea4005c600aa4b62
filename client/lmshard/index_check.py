"""Checking a store's indexes against its rows, in one snapshot.

Used by tests (``lmshard.testing``) and by backup verification: an index entry missing for a
row, held by another row, pointing to a missing row, or carrying a value that is not what the
index function gives for the row is reported, one line per problem.
"""

from __future__ import annotations

from typing import Any

from lmshard.bound_tables import BoundIndex, BoundTable
from lmshard.errors import KeyEncodingError
from lmshard.index_values import decode_index_value
from lmshard.store import Store
from lmshard.txn import ReadTxn

MAX_PROBLEMS = 100
"""verify_indexes() stops after this many problems: past that, more detail does not help."""


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
            text = _row_entry_problem(txn, b, bi, kb, value)
            if text is not None and not problems.add(text):
                return False
    return True


def _row_entry_problem(
    txn: Any, b: BoundTable, bi: BoundIndex, kb: bytes, value: Any
) -> str | None:
    """What is wrong with the index entry of one row, or None when it is right."""
    where = f"{b.name}.{bi.name}"
    try:
        ivb = bi.encode(value)
    except KeyEncodingError as exc:
        return f"{where}: row {_show_key(b, kb)}: {exc.message}"
    if ivb is None:  # a nullable index leaves this row out
        return None
    if bi.unique:
        holder = txn.get(ivb, db=bi.db)
        if holder == kb:
            return None
        return f"{where}: row {_show_key(b, kb)} with value {_show_ivb(ivb)} is " + (
            "missing from the index" if holder is None
            else f"not in the index: the entry points to row {_show_key(b, holder)}"
        )
    if txn.cursor(db=bi.db).set_key_dup(ivb, kb):
        return None
    return (
        f"{where}: row {_show_key(b, kb)} with value {_show_ivb(ivb)} is missing "
        "from the index"
    )


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
