"""How a config key is declared once and read from that declaration.

A ``Setting`` is one key of the file: its dotted key, its ``Kind`` (how a TOML value is read,
checked and written back), its default as written in TOML, and its doc (the comment above it in
every written file). ``setting()`` attaches one to a dataclass field, so the field that holds a
value is also the declaration of the key it comes from; ``settings_of`` lists them.

A ``Reader`` holds the raw values of one file; ``reader.value(key)`` reads a key through its
kind on first use, so a kind may ask for another key's value (slots for ``slot_map.runs``, the
run directory for an endpoint) whatever the order of the keys.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from lmshard.config.errors import ConfigError

_SETTING = "lmshard.setting"
_TABLE = "lmshard.table"


class Kind:
    """How one kind of value is read from TOML, checked, and written back. Subclasses say
    what they expect in their error messages."""

    optional = False
    """An unset key (default None) reads as None, and is not written."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        """The checked value of ``raw`` (TOML) for ``key``; ``reader.error`` if bad."""
        raise NotImplementedError

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        """``value`` as TOML (what ``read`` turns back into it); None: leave the key out."""
        return value

    def from_keyword(self, value: Any) -> Any:
        """A ``make_config`` keyword value as TOML would give it; the value a field holds is
        accepted too (a path, a tuple)."""
        return to_toml_types(value)


def to_toml_types(value: Any) -> Any:
    """``value`` with paths as strings, sequences as lists, mappings and dataclasses as dicts
    (leaving out fields that are None), as parsed TOML would have them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: to_toml_types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_toml_types(v) for v in value]
    return value


class Setting(NamedTuple):
    """One key of the config file, declared once."""

    key: str
    """The dotted key: ``shards``, ``storage.map_size``."""
    kind: Kind
    default: Any
    """The value a file that leaves the key out has, as written in TOML; None: unset."""
    doc: str
    """What the key means; the comment above it in every file lmshard writes."""
    name: str = ""
    """The ``Config`` attribute (and ``make_config`` keyword) that holds the value."""
    example: str | None = None
    """A value shown commented out in config/lmshard.toml for a key unset by default."""

    @property
    def table(self) -> str:
        """``storage`` for ``storage.map_size``, ``""`` for a top-level key."""
        return self.key.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        """``map_size`` for ``storage.map_size``."""
        return self.key.rpartition(".")[2]


def setting(key: str, kind: Kind, default: Any, doc: str, *, example: str | None = None) -> Any:
    """A dataclass field that holds the value of config key ``key`` (see ``Setting``)."""
    declared = Setting(key, kind, default, doc, example=example)
    if kind.optional:
        return dataclasses.field(default=None, metadata={_SETTING: declared})
    return dataclasses.field(metadata={_SETTING: declared})


def table_of(cls: type) -> Any:
    """A dataclass field holding a whole optional table (``[curve]``) as a ``cls`` whose own
    fields are settings: ``cls`` when the file has the table, None when it does not."""
    return dataclasses.field(default=None, metadata={_TABLE: cls})


def setting_of(field: dataclasses.Field[Any]) -> Setting | None:
    """The setting declared by a dataclass field, named after the field; None if it is not."""
    declared: Setting | None = field.metadata.get(_SETTING)
    return declared._replace(name=field.name) if declared is not None else None


def table_class(field: dataclasses.Field[Any]) -> type | None:
    """The dataclass a ``table_of`` field holds; None for any other field."""
    cls: type | None = field.metadata.get(_TABLE)
    return cls


def settings_of(cls: type) -> list[Setting]:
    """Every setting declared by ``cls``'s fields, in field order, tables' keys included."""
    out: list[Setting] = []
    for field in dataclasses.fields(cls):
        declared, table = setting_of(field), table_class(field)
        if declared is not None:
            out.append(declared)
        elif table is not None:
            out.extend(settings_of(table))
    return out


class WriteContext(NamedTuple):
    """What writing a value back needs: where relative paths start, and the run directory
    (endpoints that follow their default pattern are written as that pattern)."""

    relative_to: Path | None
    run_dir: Path

    def path(self, path: Path) -> str:
        """``path`` relative to ``relative_to``, or absolute if that is None."""
        if self.relative_to is None:
            return str(path)
        return os.path.relpath(path, self.relative_to)


class Reader:
    """The raw values of one config (file or ``make_config`` keywords) by dotted key, each read
    and checked through its setting's kind on first use."""

    def __init__(self, settings: Mapping[str, Setting], flat: Mapping[str, Any],
                 tables: Iterable[str], *, file: Path | None, base_dir: Path) -> None:
        self.settings = settings
        self.flat = flat
        self.tables = frozenset(tables)
        self.file = file
        self.base_dir = base_dir
        self._values: dict[str, Any] = {}

    def raw(self, key: str) -> Any:
        """The TOML value of ``key``: as given, else its default."""
        return self.flat.get(key, self.settings[key].default)

    def value(self, key: str) -> Any:
        """The checked value of ``key`` (ConfigError if it is bad)."""
        if key not in self._values:
            self._values[key] = self.settings[key].kind.read(self.raw(key), key, self)
        return self._values[key]

    def has_table(self, table: str) -> bool:
        """Whether the file has ``[table]`` (perhaps empty)."""
        return table in self.tables

    def error(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        """A ConfigError on ``key`` in this config's file."""
        return ConfigError(message, key=key, file=self.file, hint=hint)

    def resolve(self, text: str, key: str) -> Path:
        """Path ``text`` of ``key``, made absolute against the file's (or base) directory."""
        try:
            return (self.base_dir / Path(text).expanduser()).resolve()
        except RuntimeError as exc:  # "~user/..." for a user that does not exist
            raise self.error(key, f"got {text!r}: {exc}; expected a path whose ~ names a "
                                  "user of this host") from exc

    def values_of(self, cls: type) -> dict[str, Any]:
        """Keyword arguments for ``cls``: each field's setting read, each table built."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            declared, table = setting_of(field), table_class(field)
            if declared is not None:
                out[field.name] = self.value(declared.key)
            elif table is not None and self.has_table(field.name):
                out[field.name] = table(**self.values_of(table))
            elif table is not None:
                out[field.name] = None
        return out
