"""How every lmshard socket declares its messages: one ``Channel`` per socket, one ``Message``
per message, each with its code, sender, fields (with their checks and meaning) and doc.

Both sides build and read frames through the declaration, never with a literal code or a
hand-built body, and ``docs/protocol.md`` is rendered from every channel registered here
(``python -m lmshard.protocol``), so the documentation cannot drift from the code. A channel
decides its frame layout (the owners' request frames, the backup socket's control frames, the
stats PUB frames); a message decides what its fields are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from lmshard.errors import LimitExceeded, ProtocolError

Check = Callable[[Any], bool]
"""A field's validation: True if a decoded value is acceptable."""


@dataclass(frozen=True)
class Field:
    """One field of a message: its name, the check a decoded value must pass, its meaning."""

    name: str
    check: Check
    doc: str = ""


@dataclass(frozen=True)
class Message:
    """One message of a channel. ``doc`` is its specification; ``data`` marks a message whose
    control frame is followed by a frame of raw bytes."""

    channel: str
    code: int
    name: str
    sender: str
    fields: tuple[Field, ...]
    doc: str
    data: bool = False

    def check(self, values: list[Any]) -> str | None:
        """What is wrong with ``values`` as this message's fields, or None."""
        if len(values) != len(self.fields):
            return f"{self.name} has {len(self.fields)} fields, this one {len(values)}"
        for f, value in zip(self.fields, values, strict=True):
            if not f.check(value):
                return f"{self.name}: bad {f.name} {value!r:.60}"
        return None


@dataclass
class Channel:
    """The messages of one socket, by code and by name, and how its frames look (``frame``,
    for the docs)."""

    name: str
    doc: str
    frame: str
    messages: dict[int, Message] = field(default_factory=dict)
    by_name: dict[str, Message] = field(default_factory=dict)

    def declare(self, code: int, name: str, sender: str, fields: tuple[Field, ...] = (),
                doc: str = "", *, data: bool = False) -> Message:
        """Add a message; codes and names are unique within the channel."""
        if code in self.messages or name in self.by_name:
            raise ValueError(f"channel {self.name}: message {code} {name} declared twice")
        m = Message(self.name, code, name, sender, tuple(fields), doc.strip(), data)
        self.messages[code] = m
        self.by_name[name] = m
        return m

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages.values())

    def table(self) -> str:
        """The Markdown table of this channel's messages."""
        lines = ["| code | message | sent by | fields | meaning |", "|---|---|---|---|---|"]
        for m in self:
            names = ", ".join(f.name for f in m.fields) + (" + data frame" if m.data else "")
            lines.append(f"| {m.code} | `{m.name}` | {m.sender} | {names or '-'} | "
                         f"{' '.join(m.doc.split())} |")
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        """This channel's section of docs/protocol.md."""
        return (f"## {self.name}\n\n{self.doc.strip()}\n\nFrames: {self.frame.strip()}\n\n"
                + self.table())


CHANNELS: dict[str, Channel] = {}
"""Every channel, in the order declared; docs/protocol.md lists them all."""


def channel(name: str, doc: str, frame: str) -> Channel:
    """Create and register a channel (once per name)."""
    if name in CHANNELS:
        raise ValueError(f"channel {name} declared twice")
    ch = CHANNELS[name] = Channel(name, doc, frame)
    return ch


def unpack_control(frame: bytes, *, name: str, version: int, limit: int | None, hint: str,
                   strict_map_key: bool = True) -> Any:
    """The msgpack body of a control frame of the channel ``name`` whose first byte is its
    version: the size (at most ``limit``), the version byte and the msgpack checked, with typed
    errors (``hint`` for a version mismatch); what the body holds is the caller's to check."""
    if limit is not None and len(frame) > limit:
        raise LimitExceeded(f"{name} frame of {len(frame):,} bytes is over the limit of "
                            f"{limit:,} bytes")
    if not frame:
        raise ProtocolError("empty frame")
    if frame[0] != version:
        raise ProtocolError(f"{name} protocol version {frame[0]} is not supported (this side "
                            f"speaks {version})", hint=hint)
    try:
        return msgpack.unpackb(memoryview(frame)[1:], raw=False, use_list=True,
                               strict_map_key=strict_map_key)
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None


# -- field checks shared by channels -------------------------------------------------------------


def uint(v: Any) -> bool:
    """A non-negative int below 2**63."""
    return type(v) is int and 0 <= v < 2**63


def flag(v: Any) -> bool:
    return type(v) is bool


def text(v: Any) -> bool:
    """A string of at most 4096 characters."""
    return type(v) is str and len(v) <= 4096


def optional(check: Check) -> Check:
    """``check``, or nil."""
    return lambda v: v is None or check(v)
