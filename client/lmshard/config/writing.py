"""Writing a config back as TOML: every key under its doc comment, in declaration order.

Values are rendered by ``tomli_w`` (quoting, escapes, arrays); this module only lays out the
tables and the comments, which ``tomli_w`` does not write. ``config/lmshard.toml`` is the same
rendering of the built-in defaults, with the keys that are unset by default shown commented out
(``example=True``).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from typing import Any

import tomli_w

from lmshard.config.settings import Setting, WriteContext, setting_of, table_class

WIDTH = 96
"""Longest comment line."""


def render_toml(config: Any, out: WriteContext, *, header: str,
                unset: Sequence[Setting] = (), example: bool = False) -> str:
    """``config`` (a dataclass whose fields are settings) as TOML under ``header`` (a
    comment). ``unset`` are settings no field holds (written only as examples); ``example``
    shows every key not written as a commented-out example, if it declares one."""
    entries: list[tuple[Setting, Any]] = []
    tables: set[str] = set()
    _collect(config, type(config), out, entries, tables)
    entries.extend((s, None) for s in unset)
    groups: dict[str, list[tuple[Setting, Any]]] = {}
    for declared, value in entries:
        groups.setdefault(declared.table, []).append((declared, value))
    lines = _comment(header)
    for table, group in groups.items():
        lines.extend(_table(table, group, present=table in tables, example=example))
    return "\n".join(lines) + "\n"


def _collect(obj: Any, cls: type, out: WriteContext, entries: list[tuple[Setting, Any]],
             tables: set[str]) -> None:
    """Each setting of ``cls`` with the TOML value of ``obj`` (None: not written); the names of
    the optional tables ``obj`` has go in ``tables``."""
    for field in dataclasses.fields(cls):
        declared, table = setting_of(field), table_class(field)
        value = getattr(obj, field.name) if obj is not None else None
        if declared is not None:
            toml = None if obj is None else declared.kind.write(value, declared, out)
            entries.append((declared, toml))
        elif table is not None:
            if value is not None:
                tables.add(field.name)
            _collect(value, table, out, entries, tables)


def _table(table: str, group: list[tuple[Setting, Any]], *, present: bool, example: bool
           ) -> list[str]:
    """One table's lines: top-level keys each after a blank line; a table under its header,
    commented out when only examples are shown, left out when nothing is."""
    shown = [(s, v) for s, v in group if v is not None or (example and s.example is not None)]
    if not table:
        return [line for s, v in shown for line in ["", *_key(s, v)]]
    if not shown and not present:
        return []
    written = present or any(v is not None for _, v in shown)
    lines = ["", f"[{table}]" if written else f"# [{table}]"]
    for declared, value in shown:
        lines.extend(_key(declared, value))
    return lines


def _key(declared: Setting, value: Any) -> list[str]:
    """The doc comment and the line(s) of one key; commented out with its example if unset."""
    if value is None:
        return [*_comment(declared.doc), f"# {declared.leaf} = {declared.example}"]
    toml = tomli_w.dumps({declared.leaf: value}).rstrip("\n")
    # split("\n"), not splitlines(): a string value may hold other line breaks (U+0085, U+2028)
    return [*_comment(declared.doc), *toml.split("\n")]


def _comment(text: str) -> list[str]:
    """``text`` as comment lines, wrapped; a newline in it starts a new line, a blank line
    separates paragraphs."""
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        if lines:
            lines.append("#")
        for line in paragraph.split("\n"):
            lines.extend("# " + part for part in textwrap.wrap(
                line, WIDTH - 2, break_long_words=False, break_on_hyphens=False))
    return lines
