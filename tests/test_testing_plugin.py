"""The pytest plugin (lmshard.testing): fixtures run in a real inner pytest, and the index
verifier finding damage done to a real store's index databases."""

from __future__ import annotations

import pytest

import lmshard
from lmshard.keys import encode_index_value
from lmshard.testing import assert_consistent, purge_all, verify_indexes
from tests.conftest import uid, user

pytest_plugins = ["pytester"]

INNER_TESTS = '''
import lmshard
import pytest
from lmshard.testing import assert_consistent, verify_indexes

def schema():
    s = lmshard.Schema("inner")
    t = s.table("users", table_id="0e5f1a2b-3c4d-4e6f-8a9b-0c1d2e3f4a5b", key="uint64")
    t.index("by_email", lambda v: v["email"], unique=True)
    s.table("notes", table_id="1f6a2b3c-4d5e-4f7a-9b0c-1d2e3f4a5b6c", key="str")
    return s

def test_factory_gives_a_fresh_store(lmshard_store_factory, tmp_path):
    store = lmshard_store_factory(schema())
    assert store.path.startswith(str(tmp_path))
    assert store.sync is False
    store.put("users", 1, {"email": "a@x.org"})
    assert store.lookup("users", "by_email", "a@x.org") == [(1, {"email": "a@x.org"})]
    other = lmshard_store_factory(schema(), sync=True)
    assert other.path != store.path and other.sync is True
    assert other.count("users") == 0
    assert verify_indexes(store) == []

def test_purge_empties_every_table(lmshard_store_factory, lmshard_purge):
    store = lmshard_store_factory(schema())
    store.put("users", 1, {"email": "a@x.org"})
    store.put("notes", "n", "text")
    assert lmshard_purge(store) == {"users": 1, "notes": 1}
    assert store.count("users") == store.count("notes") == 0
    store.put("users", 2, {"email": "a@x.org"})  # the index was emptied too
    assert_consistent(store)

def test_a_damaged_index_fails_at_teardown(lmshard_store_factory):
    store = lmshard_store_factory(schema())
    store.put("users", 1, {"email": "a@x.org"})
    with store.write() as w:  # remove the row behind the index's back
        w.txn.delete(w.tables["users"].table.key.encode(1), db=w.tables["users"].db)

def test_verify_false_skips_the_check(lmshard_store_factory):
    store = lmshard_store_factory(schema(), verify=False)
    store.put("users", 1, {"email": "a@x.org"})
    with store.write() as w:
        w.txn.delete(w.tables["users"].table.key.encode(1), db=w.tables["users"].db)

def test_closed_stores_are_left_alone(lmshard_store_factory):
    store = lmshard_store_factory(schema())
    store.close()
'''


def test_plugin_fixtures_in_a_real_pytest_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No entry-point plugins in the inner run: `-p lmshard.testing` must be what brings the
    # fixtures, and an installed `lmshard` entry point must not register the module twice.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "lmshard.testing", "-q")
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_a_damaged_index_fails_at_teardown*",
         "*users.by_email: entry 'a@x.org' points to row 1, which does not exist*"]
    )


def test_without_the_plugin_the_fixtures_are_missing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner="def test_x(lmshard_store_factory):\n    pass\n")
    result = pytester.runpytest("-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'lmshard_store_factory' not found*"])


def fill(store: lmshard.Store) -> None:
    with store.batch() as b:
        for i in range(20):
            phone = f"+1-{i}" if i % 2 else None
            b.put("users", uid(i), user(f"{i}@x.org", country="fr" if i < 5 else "de", phone=phone))


def test_verify_indexes_on_a_consistent_store(store: lmshard.Store) -> None:
    fill(store)
    store.delete("users", uid(3))
    store.put("users", uid(4), user("changed@x.org", country="it", age=1))
    assert verify_indexes(store) == []
    with store.read() as r:
        assert verify_indexes(r) == []
    assert_consistent(store)


def damage(store: lmshard.Store, fn) -> None:  # type: ignore[no-untyped-def]
    """Write into the index databases directly, as a bug or a bad restore would."""
    with store.write() as w:
        b = w.tables["users"]
        fn(w.txn, b, lambda name: b.index(name).db)


def test_verify_indexes_reports_each_kind_of_damage(store: lmshard.Store) -> None:
    fill(store)
    kb = lambda n: uid(n).bytes  # noqa: E731
    damage(store, lambda txn, b, db: txn.delete(encode_index_value("7@x.org"), db=db("by_email")))
    damage(store, lambda txn, b, db: txn.put(encode_index_value("ghost@x.org"), kb(99),
                                             db=db("by_email")))
    damage(store, lambda txn, b, db: txn.put(encode_index_value(("fr", 30)), kb(12),
                                             db=db("by_country_age")))
    damage(store, lambda txn, b, db: txn.put(encode_index_value("+1-0"), kb(0), db=db("by_phone")))
    damage(store, lambda txn, b, db: txn.put(encode_index_value("1@x.org"), kb(2),
                                             db=db("by_email")))
    problems = verify_indexes(store)
    expected = [
        f"users.by_email: row '{uid(1)}' with value '1@x.org' is not in the index: the entry "
        f"points to row '{uid(2)}'",
        f"users.by_email: row '{uid(7)}' with value '7@x.org' is missing from the index",
        f"users.by_email: entry '1@x.org' points to row '{uid(2)}', whose index value is "
        "'2@x.org'",
        f"users.by_email: entry 'ghost@x.org' points to row '{uid(99)}', which does not exist",
        f"users.by_country_age: entry ('fr', 30) points to row '{uid(12)}', whose index value "
        "is ('de', 30)",
        f"users.by_phone: entry '+1-0' points to row '{uid(0)}', which the index leaves out "
        "(its value is None)",
    ]
    assert sorted(problems) == sorted(expected)
    with pytest.raises(AssertionError, match="6 index problem"):
        assert_consistent(store)


def test_verify_indexes_stops_after_max_problems(store: lmshard.Store) -> None:
    fill(store)
    damage(store, lambda txn, b, db: txn.drop(db("by_email"), delete=False))
    problems = verify_indexes(store, max_problems=5)
    assert len(problems) == 6 and problems[-1] == "... stopped after 5 problems"


def test_purge_all(store: lmshard.Store) -> None:
    fill(store)
    store.put("blobs", 1, b"x")
    assert purge_all(store) == {"users": 20, "events": 0, "counters": 0, "blobs": 1}
    assert verify_indexes(store) == []
    with store.read() as r:
        assert r.index_count("users", "by_email") == 0


def test_local_service_that_cannot_start_leaves_no_owner_running(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from lmshard.testing import LocalService

    # The owners find this module in their working directory; this process cannot import it,
    # so waiting for them fails after they started.
    (tmp_path / "only_for_owners_schema.py").write_text(
        "import lmshard\nschema = lmshard.Schema('x')\n")
    monkeypatch.chdir(tmp_path)
    svc = LocalService(tmp_path / "svc", "only_for_owners_schema:schema", shards=2)
    with pytest.raises(Exception, match="only_for_owners_schema"), svc:
        pass
    assert svc.procs and all(p.poll() is not None for p in svc.procs.values())
