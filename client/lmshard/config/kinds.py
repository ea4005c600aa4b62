"""The kinds of config values: how each is read from TOML, checked, said in error messages
(``got 0; expected an integer from 1 to 256``), and written back.

A declaration picks a kind and its limits (``Integer(1, MAX_SHARDS)``); relations between keys
(``slots`` >= ``shards``) are limits too, naming the other key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from lmshard.config.endpoints import escape_braces, expand_endpoint, format_http, parse_http
from lmshard.config.errors import ConfigError, describe
from lmshard.config.settings import Kind, Reader, Setting, WriteContext
from lmshard.config.sizes import format_size, parse_size, round_up_to_pages
from lmshard.routing import SlotMap


class Integer(Kind):
    """An integer from ``lo`` to ``hi``, in ``unit`` if given. ``at_least`` names a key whose
    value this one may not be below; ``above(value)`` explains, as (message, hint), a value
    past ``hi``; ``optional``: may be unset (None)."""

    def __init__(self, lo: int, hi: int, *, unit: str = "", at_least: str | None = None,
                 above: Callable[[int], tuple[str, str]] | None = None,
                 optional: bool = False) -> None:
        self.lo, self.hi, self.unit = lo, hi, unit
        self.at_least, self.above, self.optional = at_least, above, optional

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if raw is None and self.optional:
            return None
        expected = f"an integer from {self.lo} to {self.hi}"
        if self.unit:
            expected += f" ({self.unit})"
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise reader.error(key, f"got {describe(raw)}; expected {expected}")
        if raw > self.hi and self.above is not None:
            message, hint = self.above(raw)
            raise reader.error(key, f"got {raw:,}; expected {expected} ({message})", hint)
        if not self.lo <= raw <= self.hi:
            raise reader.error(key, f"got {raw}; expected {expected}")
        if self.at_least is not None and raw < (floor := reader.value(self.at_least)):
            raise reader.error(key, f"got {raw}, fewer than {self.at_least} ({floor}); expected "
                                    f"{key.rpartition('.')[2]} >= {self.at_least}")
        return raw


class Boolean(Kind):
    """true or false."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if not isinstance(raw, bool):
            raise reader.error(key, f"got {describe(raw)}; expected true or false")
        return raw


class Seconds(Kind):
    """A finite number of seconds, at least ``lo``; ``off``: 0 too, meaning the feature is
    off."""

    def __init__(self, lo: float, *, off: bool = False) -> None:
        self.lo, self.off = lo, off

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        expected = f"a number of seconds >= {self.lo}" + (", or 0 (off)" if self.off else "")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise reader.error(key, f"got {describe(raw)}; expected {expected}")
        if self.off and raw == 0:
            return 0.0
        if not 0 < raw < float("inf") or raw < self.lo:
            raise reader.error(key, f"got {raw!r}; expected {expected}")
        return float(raw)


class Size(Kind):
    """A byte size > 0 (see ``parse_size``), rounded up to whole pages; ``at_most`` names a
    size key this one may not exceed."""

    def __init__(self, *, at_most: str | None = None) -> None:
        self.at_most = at_most

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        size = parse_size(raw, key=key, file=reader.file)
        if size <= 0:
            raise reader.error(key, f"got {size}; expected a size > 0")
        size = round_up_to_pages(size)
        if self.at_most is not None and size > (cap := reader.value(self.at_most)):
            raise reader.error(
                key, f"{size} bytes is larger than {self.at_most} ({cap} bytes); expected "
                f"{key.rpartition('.')[2]} <= {self.at_most.rpartition('.')[2]}")
        return size

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return format_size(value)


def _text(raw: Any, key: str, reader: Reader, expected: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise reader.error(key, f"got {describe(raw)}; expected {expected}")
    return raw


class SchemaRef(Kind):
    """``"package.module:attr"``: where the schema object is imported from."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        value = _text(raw, key, reader, 'a "package.module:attr" string')
        module, sep, attr = value.partition(":")
        if not (
            sep
            and all(part.isidentifier() for part in module.split("."))
            and all(part.isidentifier() for part in attr.split("."))
        ):
            raise reader.error(
                key,
                f'got {value!r}; expected "package.module:attr" (a module import path, a '
                'colon, the name of the schema object), e.g. "myservice.schema:schema"',
            )
        return value


def _path_expected(reader: Reader) -> str:
    where = "the config file's directory" if reader.file else "the base directory"
    return f"a path (relative paths are relative to {where})"


class LocalPath(Kind):
    """A path, made absolute against the config file's directory; ``optional``: may be unset."""

    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if raw is None and self.optional:
            return None
        return reader.resolve(_text(raw, key, reader, _path_expected(reader)), key)

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return None if value is None else out.path(value)


class LocalPaths(Kind):
    """An array of paths, each made absolute like ``LocalPath``."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if not isinstance(raw, list):
            raise reader.error(key, f"got {describe(raw)}; expected an array of path strings")
        items = [(f"{key}[{i}]", item) for i, item in enumerate(raw)]
        return tuple(reader.resolve(_text(item, item_key, reader, "a path string"), item_key)
                     for item_key, item in items)

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return [out.path(p) for p in value]


class Endpoint(Kind):
    """One endpoint pattern with ``{run_dir}``; written back as its default pattern when it
    expands to the same endpoint."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        template = _text(raw, key, reader, "an endpoint string")
        return expand_endpoint(template, key=key, file=reader.file,
                               run_dir=reader.value("run_dir"))

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        pattern: str = setting.default
        return pattern if value == pattern.format(run_dir=str(out.run_dir)) else escape_braces(
            value)


class ShardEndpoints(Kind):
    """One endpoint per shard: a pattern with ``{run_dir}``, ``{shard}`` and ``{port}`` (the
    key ``port_key`` plus the shard number), or an array of one endpoint per shard."""

    def __init__(self, port_key: str) -> None:
        self.port_key = port_key

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        shards: int = reader.value("shards")
        base_port: int | None = reader.value(self.port_key)
        out = []
        for n, (item_key, template) in enumerate(self._templates(raw, key, reader, shards)):
            fields = {"shard": n}
            if base_port is not None:
                if base_port + n > 65535:
                    raise reader.error(self.port_key, f"{base_port} + shard {n} is past port "
                                                      "65535; expected lower")
                fields["port"] = base_port + n
            out.append(expand_endpoint(template, key=item_key, file=reader.file,
                                       run_dir=reader.value("run_dir"), port_key=self.port_key,
                                       **fields))
        return tuple(out)

    @staticmethod
    def _templates(raw: Any, key: str, reader: Reader, shards: int) -> list[tuple[str, str]]:
        if isinstance(raw, str) and raw:
            return [(key, raw)] * shards
        if not isinstance(raw, list):
            raise reader.error(
                key,
                f"got {describe(raw)}; expected an endpoint pattern string (placeholders "
                "{run_dir}, {shard}, {port}) or an array with one endpoint per shard",
            )
        if len(raw) != shards:
            raise reader.error(
                key,
                f"has {len(raw)} endpoints; expected one per shard ({shards}), or one "
                'pattern string with {shard} or {port}, e.g. "tcp://10.0.0.5:{port}"',
            )
        return [(f"{key}[{i}]", _text(item, f"{key}[{i}]", reader, "an endpoint string"))
                for i, item in enumerate(raw)]

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        pattern: str = setting.default
        run_dir = str(out.run_dir)
        if all(ep == pattern.format(run_dir=run_dir, shard=n) for n, ep in enumerate(value)):
            return pattern
        return [escape_braces(ep) for ep in value]


class HttpAddress(Kind):
    """``"HOST:PORT"`` of an HTTP server, or ``"off"`` (read as None)."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if raw is False or raw == "off":
            return None
        if not isinstance(raw, str):
            raise reader.error(key, f'got {describe(raw)}; expected "HOST:PORT" or "off"')
        try:
            return parse_http(raw)
        except ValueError as exc:
            raise reader.error(key, str(exc)) from None

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return format_http(value)

    def from_keyword(self, value: Any) -> Any:
        return format_http(value) if isinstance(value, tuple) else value


class SlotRuns(Kind):
    """The slot map as runs ``[first, end (exclusive), shard]``; unset: the even split of
    ``slots`` over ``shards``, which is also left out when written."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        shards, slots = reader.value("shards"), reader.value("slots")
        if raw is None:
            return SlotMap(shards, slots)
        if not isinstance(raw, list):
            raise reader.error(key, f"got {describe(raw)}; expected an array of [start, end, "
                                    "shard]")
        try:
            # A map a re-shard wrote (version > 0) may leave a shard it adds or empties
            # without slots; a hand-written one gives each shard some.
            empty_ok = bool(reader.value("slot_map.version"))
            return SlotMap.from_runs(shards, slots, raw, empty_ok=empty_ok)
        except ValueError as exc:
            raise reader.error(
                key,
                f"{str(exc).removeprefix('slot map: ')}; expected sorted, contiguous runs "
                f"[start, end (exclusive), shard] covering slots 0 to {slots - 1} and giving "
                f"each of the {shards} shards at least one slot",
            ) from exc

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return None if value.is_default() else value.runs()

    def from_keyword(self, value: Any) -> Any:
        return value.runs() if isinstance(value, SlotMap) else super().from_keyword(value)


class MapVersion(Integer):
    """The slot map's version (``lmshard.slot_state``): 0 until a re-shard, and left out when
    written while it is."""

    def __init__(self) -> None:
        super().__init__(0, 2**62)

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return value or None


REPLICA_ROLES = ("write", "stat", "backup", "changes")
"""The endpoints of one copy of a shard, in the order ``{port}`` counts them: its request
endpoint, then those of its stats, backup and change-feed channels."""
_REPLICA_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")


class ReplicaNames(Kind):
    """An array of distinct replica names (letters, digits, ``.``, ``_``, ``-``; a host name
    or address works, which a ``{replica}`` endpoint pattern can then use)."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        if not isinstance(raw, list):
            raise reader.error(key, f'got {describe(raw)}; expected an array of names, e.g. '
                                    '["10.0.0.6"] or ["b"]')
        names: list[str] = []
        for i, item in enumerate(raw):
            name = _text(item, f"{key}[{i}]", reader, "a name string")
            if _REPLICA_NAME_RE.fullmatch(name) is None or name == "home":
                raise reader.error(f"{key}[{i}]", f"got {name!r}; expected a name of letters, "
                                   "digits, '.', '_' and '-' (not \"home\", the name of the "
                                   "shards' own copy), at most 64 characters")
            if name in names:
                raise reader.error(f"{key}[{i}]", f"{name!r} is listed twice; expected each "
                                                  "replica once")
            names.append(name)
        return tuple(names)

    def write(self, value: Any, setting: Setting, out: WriteContext) -> Any:
        return list(value)


class ReplicaLocal(Kind):
    """``""`` (the shards' own copy) or one of ``replica.names``."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        name = _text(raw, key, reader, 'a replica name or ""') if raw != "" else ""
        names: tuple[str, ...] = reader.value("replica.names")
        if name and name not in names:
            raise reader.error(key, f"got {name!r}; expected \"\" (this host holds the shards' "
                                    f"own copy) or one of replica.names {list(names)}")
        return name


class ReplicaEndpoint(Kind):
    """The endpoint pattern of every replica's copy of every shard: ``{replica}`` (its name),
    ``{role}`` (write, stat, backup, changes), ``{shard}``, ``{run_dir}``, and ``{port}``:
    ``replica.base_port`` + 4 x shard + the role's place in that list. Read as the pattern,
    after checking that every endpoint it gives is valid."""

    def read(self, raw: Any, key: str, reader: Reader) -> Any:
        template = _text(raw, key, reader, "an endpoint pattern string")
        names: tuple[str, ...] = reader.value("replica.names")
        base_port: int | None = reader.value("replica.base_port")
        shards: int = reader.value("shards")
        run_dir = reader.value("run_dir")
        for name in names:
            for shard in range(shards):
                for role in REPLICA_ROLES:
                    replica_endpoint(template, name, shard, role, run_dir, base_port,
                                     key=key, file=reader.file)
        return template


def replica_endpoint(template: str, name: str, shard: int, role: str, run_dir: Any,
                     base_port: int | None, *, key: str = "replica.endpoint",
                     file: Any = None) -> str:
    """One endpoint of replica ``name``'s copy of ``shard`` (see ``ReplicaEndpoint``)."""
    fields: dict[str, Any] = {"shard": shard, "replica": name, "role": role}
    if base_port is not None:
        port = base_port + 4 * shard + REPLICA_ROLES.index(role)
        if port > 65535:
            raise ConfigError(f"replica.base_port {base_port} + 4 x shard {shard} is past port "
                              "65535; expected lower", key="replica.base_port", file=file)
        fields["port"] = port
    return expand_endpoint(template, key=key, file=file, run_dir=run_dir,
                           port_key="replica.base_port", **fields)
