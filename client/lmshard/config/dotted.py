"""Dotted keys: the TOML tables of a file flattened to ``durability.sync`` style keys, and the
message for a key that is not declared, with the key most likely meant.

A misspelt key is never ignored: ``[durability] snyc = true`` says ``did you mean
'durability.sync'?`` and lists the keys ``[durability]`` has.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmshard.config.errors import ConfigError, describe


class KeyNames:
    """The declared dotted keys, in declaration order, and the tables they are in."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(keys)
        self.tables = frozenset(key.rpartition(".")[0] for key in self.keys if "." in key)

    def flatten(self, raw: Mapping[str, Any], *, file: Path | None
                ) -> tuple[dict[str, Any], set[str]]:
        """``raw`` (parsed TOML) as {dotted key: value}, and the tables it has; ConfigError for
        a key not declared, a table where a value belongs, or a value where a table does."""
        flat: dict[str, Any] = {}
        tables: set[str] = set()
        self._flatten(raw, "", flat, tables, file)
        return flat, tables

    def _flatten(self, table: Mapping[str, Any], prefix: str, flat: dict[str, Any],
                 tables: set[str], file: Path | None) -> None:
        for name, value in table.items():
            key = prefix + name
            if key in self.tables:
                if not isinstance(value, dict):
                    close = difflib.get_close_matches(key, self.keys, n=1)
                    also = f"; or did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(f"got {describe(value)}; expected a table ([{key}]){also}",
                                      key=key, file=file)
                tables.add(key)
                self._flatten(value, key + ".", flat, tables, file)
            elif key in self.keys:
                if isinstance(value, dict):
                    close = difflib.get_close_matches(key, list(self.tables), n=1)
                    if close:
                        raise ConfigError(f"got a table; {key!r} is not a table, did you mean "
                                          f"[{close[0]}]?", key=key, file=file)
                flat[key] = value
            else:
                raise ConfigError(self.unknown(key, prefix[:-1], is_table=isinstance(value, dict)),
                                  key=key, file=file)

    def unknown(self, key: str, table: str, *, is_table: bool) -> str:
        """The message for an undeclared ``key`` in ``table`` (``""``: the top level): the key
        meant, and the keys that table has.

        It suggests the kind of thing the file wrote: a table for a table (``[shardd]`` ->
        shard), a key for a value (``shardz = 4`` -> shards); the other kind only when nothing
        fits, then a key with the same last part (``sync`` -> ``durability.sync``).
        """
        tables, keys = sorted(self.tables), sorted(self.keys)
        fitting, other = (tables, keys) if is_table else (keys, tables)
        suggestion = _closest(key, fitting) or _closest(key, other)
        leaf = key.rpartition(".")[2]
        if not suggestion:
            suggestion = [k for k in fitting + other if k.rpartition(".")[2] == leaf][:1]
        siblings = [k.rpartition(".")[2] for k in self.keys if k.rpartition(".")[0] == table]
        if not table:
            siblings += tables
        message = f"unknown key {key!r}"
        if suggestion:
            message += f"; did you mean {suggestion[0]!r}?"
        where = f"[{table}]" if table else "the top level"
        return message + f" (known keys in {where}: {', '.join(siblings)})"


def _closest(key: str, candidates: list[str], cutoff: float = 0.6) -> list[str]:
    """The candidate most like ``key`` (difflib's ratio, at least ``cutoff``), as a list of at
    most one; on a tie, the one in the same table as ``key``, then the first in sorted order."""
    table = key.rpartition(".")[0]
    best: tuple[float, bool] | None = None
    found: list[str] = []
    for cand in sorted(candidates):
        m = difflib.SequenceMatcher(None, cand, key)
        if m.real_quick_ratio() < cutoff or m.quick_ratio() < cutoff:
            continue
        score = (m.ratio(), cand.rpartition(".")[0] == table)
        if score[0] >= cutoff and (best is None or score > best):
            best, found = score, [cand]
    return found
