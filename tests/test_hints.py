"""Index hints for where= scans, and the large-value warning, against a real store."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator

import pytest

import lmshard
import lmshard.txn
from lmshard import hints
from lmshard.hints import (
    INDEX_HINT_MIN_ROWS,
    LARGE_VALUE_WARNING,
    index_hint,
    large_value_warning,
    log_index_hint,
    watch_where_scan,
)
from tests.conftest import uid, user

ROWS = 1_500


@pytest.fixture(autouse=True)
def fresh_hints() -> Iterator[None]:
    hints.reset_hints()
    yield
    hints.reset_hints()


def fill(store: lmshard.Store, rows: int) -> None:
    with store.batch() as b:
        for i in range(rows):
            country = "fr" if i % 100 == 0 else "de"
            phone = f"+49-{i}" if i % 2 else None
            b.put("users", uid(i), user(f"{i}@x.org", country=country, age=20 + i % 3, phone=phone))


def scan_hint(store: lmshard.Store, where, limit=None, with_txn=True) -> tuple[list, str | None]:  # type: ignore[no-untyped-def]
    """Run a where= scan through watch_where_scan (the scan path's hook) and return its rows and
    the hint for them."""
    table = store.schema["users"]
    with store.read() as r:
        rows = r.count("users")
        found = list(watch_where_scan(r.scan("users"), table, where, limit, rows, r))
        hint = index_hint(table, rows, [v for _, v in found], rows, txn=r if with_txn else None)
    return found, hint


def test_one_row_by_email_names_the_unique_index(store: lmshard.Store) -> None:
    fill(store, ROWS)
    found, hint = scan_hint(store, lambda v: v["email"] == "7@x.org")
    assert [k for k, _ in found] == [uid(7)]
    assert hint == (
        "scan of users with where= read 1,500 rows to find 1 row; "
        "use store.lookup('users', 'by_email', '7@x.org')"
    )


def test_composite_index_exact_and_prefix(store: lmshard.Store) -> None:
    fill(store, ROWS)
    found, hint = scan_hint(store, lambda v: v["country"] == "fr" and v["age"] == 21)
    assert len(found) == 5
    assert hint is not None
    assert hint.endswith("use store.lookup('users', 'by_country_age', ('fr', 21))")
    assert sorted(found) == sorted(store.lookup("users", "by_country_age", ("fr", 21)))
    found, hint = scan_hint(store, lambda v: v["country"] == "fr")
    assert len(found) == 15
    assert hint is not None
    assert hint.endswith("use store.lookup('users', 'by_country_age', ('fr',), prefix=True)")
    assert sorted(found) == sorted(store.lookup("users", "by_country_age", ("fr",), prefix=True))


def test_no_hint_on_a_small_table(store: lmshard.Store) -> None:
    fill(store, INDEX_HINT_MIN_ROWS - 1)
    found, hint = scan_hint(store, lambda v: v["email"] == "7@x.org")
    assert len(found) == 1 and hint is None


def test_no_hint_when_many_rows_match_or_none(store: lmshard.Store) -> None:
    fill(store, ROWS)
    assert scan_hint(store, lambda v: v["age"] == 21)[1] is None  # a third of the table
    assert scan_hint(store, lambda v: v["email"] == "nobody@x.org") == ([], None)


def test_the_index_count_check_refuses_a_superset(store: lmshard.Store) -> None:
    fill(store, ROWS)
    # Rows 1 and 5 (both "de", ages 21 and 22) share a country: without the transaction the
    # prefix lookup on ("de",) looks plausible, but it would return 1,485 rows, not 2.
    where = lambda v: v["email"] in ("1@x.org", "5@x.org")  # noqa: E731
    assert scan_hint(store, where)[1] is None
    loose = scan_hint(store, where, with_txn=False)[1]
    assert loose is not None and "('de',), prefix=True" in loose


def test_nullable_index_is_not_suggested_for_rows_it_leaves_out(store: lmshard.Store) -> None:
    fill(store, ROWS)
    table = store.schema["users"]
    even = [store.get("users", uid(i)) for i in (0, 2)]  # phone None: not in by_phone
    with store.read() as r:
        hint = index_hint(table, ROWS, even[:1], ROWS, txn=r)
    assert hint is not None and "by_phone" not in hint and "by_email" in hint
    odd = store.get("users", uid(3))
    assert index_hint(table, ROWS, [odd], ROWS) is not None


def test_log_index_hint_logs_once_per_table_and_index(
    store: lmshard.Store, caplog: pytest.LogCaptureFixture
) -> None:
    fill(store, ROWS)
    table = store.schema["users"]
    with caplog.at_level(logging.WARNING, logger="lmshard.hints"), store.read() as r:
        for email in ("7@x.org", "8@x.org"):
            match = [v for _, v in r.scan("users", where=lambda v, e=email: v["email"] == e)]
            assert log_index_hint(table, ROWS, match, ROWS, txn=r) is not None
        composite = [v for _, v in r.scan("users", where=lambda v: v["country"] == "fr")]
        log_index_hint(table, ROWS, composite, ROWS, txn=r)
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "lmshard.hints"]
    assert len(logged) == 2
    assert "by_email', '7@x.org'" in logged[0]
    assert "by_country_age" in logged[1]


def test_watch_where_scan_filters_like_where_and_respects_limit(store: lmshard.Store) -> None:
    fill(store, ROWS)
    where = lambda v: v["age"] == 22  # noqa: E731
    with store.read() as r:
        expected = list(r.scan("users", where=where, limit=7))
        got = list(watch_where_scan(r.scan("users"), store.schema["users"], where, 7, ROWS, r))
        assert list(watch_where_scan(r.scan("users"), store.schema["users"], where, 0, ROWS)) == []
    assert got == expected and len(got) == 7


def test_large_value_warning_once_per_table(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmshard.hints"):
        large_value_warning("blobs", LARGE_VALUE_WARNING - 1)
        large_value_warning("blobs", LARGE_VALUE_WARNING)
        large_value_warning("blobs", 5 * LARGE_VALUE_WARNING)
        large_value_warning("images", 2 * LARGE_VALUE_WARNING)
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "lmshard.hints"]
    assert len(logged) == 2
    assert logged[0].startswith("table blobs: a 1,048,576-byte value was written")
    assert "chunk" in logged[0] and "reference" in logged[0]
    assert logged[1].startswith("table images")


# These two run once the hooks are in the store's scan and write paths (see the report).
_scan_hooked = "hints" in inspect.getsource(lmshard.txn.ReadTxn.scan)
_write_hooked = "large_value_warning" in inspect.getsource(lmshard.txn)


@pytest.mark.skipif(not _scan_hooked, reason="ReadTxn.scan does not call lmshard.hints yet")
def test_store_scan_with_where_logs_the_hint(
    store: lmshard.Store, caplog: pytest.LogCaptureFixture
) -> None:
    fill(store, ROWS)
    with caplog.at_level(logging.WARNING, logger="lmshard.hints"):
        assert len(list(store.scan("users", where=lambda v: v["email"] == "9@x.org"))) == 1
    assert any("'by_email', '9@x.org'" in rec.getMessage() for rec in caplog.records)


@pytest.mark.skipif(not _write_hooked, reason="WriteTxn does not call large_value_warning yet")
def test_store_put_of_a_large_value_logs_the_warning(
    store: lmshard.Store, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lmshard.hints"):
        store.put("blobs", 1, b"x" * 1000)
        store.put("blobs", 2, b"x" * LARGE_VALUE_WARNING)
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "lmshard.hints"]
    assert len(logged) == 1 and logged[0].startswith("table blobs")


def test_ranking_without_a_transaction() -> None:
    schema = lmshard.Schema("rank")
    t = schema.table("items", table_id="0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", key="uint64")
    t.index("by_group", lambda v: v["g"])
    t.index("by_group_kind", lambda v: (v["g"], v["k"]))
    t.index("by_serial", lambda v: v["serial"], unique=True)
    n = INDEX_HINT_MIN_ROWS

    def best(*rows: dict[str, int]) -> str:
        hint = index_hint(t, n, list(rows), n)
        assert hint is not None
        return hint.split("use ")[1]

    # one row: every index has one value for it; a unique lookup is the one that fits
    assert best({"g": 1, "k": 2, "serial": 9}) == "store.lookup('items', 'by_serial', 9)"
    # same group and kind: the narrowest whole-value lookup
    assert best({"g": 1, "k": 2, "serial": 9}, {"g": 1, "k": 2, "serial": 10}) == (
        "store.lookup('items', 'by_group_kind', (1, 2))"
    )
    # same group, different kinds: a whole value beats a composite prefix
    assert best({"g": 1, "k": 2, "serial": 9}, {"g": 1, "k": 3, "serial": 10}) == (
        "store.lookup('items', 'by_group', 1)"
    )
    t2 = lmshard.Schema("rank2").table("items", table_id=t.table_id, key="uint64")
    t2.index("by_group_kind", lambda v: (v["g"], v["k"]))
    hint = index_hint(t2, n, [{"g": 1, "k": 2}, {"g": 1, "k": 3}], n)
    assert hint is not None and hint.endswith("'by_group_kind', (1,), prefix=True)")
    # an index function failing on a row, or giving None, disqualifies that index only
    assert index_hint(t2, n, [{"g": 1}], n) is None
