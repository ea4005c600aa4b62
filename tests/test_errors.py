"""The error table: one numbered declaration, the same whatever was imported, and every error
raised anywhere in lmshard travels over the wire as a class of that table."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import lmshard
import lmshardd
from lmshard import errors
from lmshard.errors import ERRORS, BackupError, ConfigError, Error, error_classes, error_from_wire


def import_everything() -> None:
    for package in (lmshard, lmshardd):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)


def every_error_class() -> set[type[Error]]:
    found: set[type[Error]] = set()
    todo: list[type[Error]] = [Error]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_the_table_is_numbered_once_in_code_order() -> None:
    codes = [cls.code for cls in ERRORS]
    assert codes == sorted(set(codes))
    assert error_classes() == {cls.code: cls for cls in ERRORS}
    assert all(cls.__module__ == "lmshard.errors" for cls in ERRORS)
    assert all((cls.__doc__ or "").strip() for cls in ERRORS)
    assert error_classes()[70] is BackupError and error_classes()[50] is ConfigError


def test_the_table_does_not_depend_on_what_was_imported() -> None:
    import_everything()
    alone = subprocess.run(
        [sys.executable, "-c", "import json, lmshard.errors as e; "
         "print(json.dumps({c: k.__name__ for c, k in e.error_classes().items()}))"],
        capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(alone.stdout) == {str(c): k.__name__ for c, k in error_classes().items()}


def test_every_error_class_travels_as_a_class_of_the_table() -> None:
    import_everything()
    for cls in every_error_class():
        tabled = error_classes().get(cls.code)
        assert tabled is not None and issubclass(cls, tabled), (
            f"{cls.__module__}.{cls.__name__} has code {cls.code}, which is not the code of one "
            "of its ancestors in lmshard.errors.ERRORS: declare it there")


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_from_wire_rebuilds_the_typed_exception(cls: type[Error]) -> None:
    err = error_from_wire(cls.code, "what happened", "what to do")
    assert type(err) is cls
    assert err.message == "what happened" and err.hint == "what to do"
    assert str(err) == "what happened (what to do)"


def test_an_unknown_code_arrives_as_the_base_class() -> None:
    err = error_from_wire(12345, "from a newer peer", None)
    assert type(err) is Error and err.hint == Error.hint


def test_a_duplicate_code_is_refused() -> None:
    class Twin(Error):
        code = errors.UnknownTable.code

    with pytest.raises(AssertionError, match="share code 11"):
        errors._by_code((*ERRORS, Twin))
