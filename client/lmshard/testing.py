"""Testing with lmshard: temporary stores, purging tables, and checking indexes against rows.

As a pytest plugin (``-p lmshard.testing``, or the ``lmshard`` entry point) it provides:

``lmshard_store_factory``
    ``make(schema, **options)`` opens a new embedded store in the test's ``tmp_path``; after the
    test it checks every store still open with :func:`verify_indexes` (an inconsistency fails
    the test) and closes it.
``lmshard_service_factory``
    ``make(schema="module:attr", **options)``: real shard owners (:class:`LocalService`),
    started, and stopped after the test.
``lmshard_purge``
    :func:`purge_all`: empty every table of a store, e.g. between phases of one test.

:func:`verify_indexes` and :func:`assert_consistent` live in ``lmshard.index_check`` and
:class:`LocalService` in ``lmshard.local_service``, which work without pytest; they are
importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmshard.index_check import MAX_PROBLEMS, assert_consistent, verify_indexes
from lmshard.local_service import LocalService
from lmshard.store import Store
from lmshard.store import open as open_store

__all__ = [
    "MAX_PROBLEMS",
    "LocalService",
    "assert_consistent",
    "lmshard_purge",
    "lmshard_service_factory",
    "lmshard_store_factory",
    "purge_all",
    "verify_indexes",
]


def purge_all(store: Any) -> dict[str, int]:
    """Empty every table of ``store`` in one batch; returns rows dropped per table."""
    with store.batch() as b:
        return {t.name: b.purge(t) for t in store.schema.tables.values()}


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
