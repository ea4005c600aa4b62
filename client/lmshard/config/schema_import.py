"""Importing the schema object a config names (``schema = "package.module:attr"``), with the
config's ``python_path`` in front of ``sys.path``; failures name the module, the attribute and
the config file."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmshard.config.errors import ConfigError


def import_schema(schema: str, python_path: Sequence[Path], file: Path | None) -> Any:
    """The object ``schema`` names, after prepending ``python_path`` to ``sys.path`` (each
    directory once per process). ConfigError on key ``schema`` of ``file`` if it fails."""
    new = [d for d in dict.fromkeys(map(str, python_path)) if d not in sys.path]
    sys.path[0:0] = new
    module_name, _, attr = schema.partition(":")
    where = f"schema = {schema!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{where}: cannot import module {module_name!r} ({exc}); searched python_path "
            f"{[str(p) for p in python_path]} and sys.path",
            key="schema",
            file=file,
            hint="add the directory containing the module to python_path",
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
            key="schema",
            file=file,
            hint="fix the error in the schema module",
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                f"no attribute {attr!r}",
                key="schema",
                file=file,
                hint="name the object that holds the schema after the colon",
            ) from exc
    return obj
