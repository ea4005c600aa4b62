"""LMDB's named databases as the main database records them, read without touching their pages.

LMDB keeps each named database's ``MDB_db`` record (flags, page counts, entries, root) as the
value of its name in the main database. The owner sums the page counts to estimate the size of
a compacted copy before streaming it (``copy_size_estimate``); a backup's verify opens every
database with its own flags to read it to the end (``named_dbs``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

MDB_DB = struct.Struct("=IHHQQQQQ")
"""LMDB's MDB_db record (64-bit pgno_t and size_t): pad, flags, depth, branch, leaf and
overflow pages, entries, root."""
DB_FLAGS = {0x02: "reverse_key", 0x04: "dupsort", 0x08: "integerkey", 0x10: "dupfixed",
            0x20: "integerdup"}
"""MDB_db flag bits and the ``env.open_db`` keyword each one needs."""


@dataclass(frozen=True)
class NamedDb:
    """One named database: its name, the ``open_db`` keywords its flags need, its pages."""

    name: bytes
    open_flags: dict[str, bool]
    pages: int


def named_dbs(txn: lmdb.Transaction, main_db: Any) -> Iterator[NamedDb]:
    """Every named database of the snapshot ``txn`` (the main database's records of them)."""
    for key, rec in list(txn.cursor(db=main_db)):
        if len(rec) != MDB_DB.size:
            continue
        _pad, flags, _depth, branch, leaf, overflow, _entries, _root = MDB_DB.unpack(rec)
        opts = {kw: True for bit, kw in DB_FLAGS.items() if flags & bit}
        yield NamedDb(bytes(key), opts, branch + leaf + overflow)


def copy_size_estimate(txn: lmdb.Transaction, main_db: Any, page_size: int) -> int:
    """Bytes of a compacted copy of the snapshot ``txn``: every used page plus two meta pages."""
    st = txn.stat(main_db)
    pages = 2 + st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    pages += sum(db.pages for db in named_dbs(txn, main_db))
    return int(pages * page_size)
