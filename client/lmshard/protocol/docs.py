"""docs/protocol.md, rendered from every channel in ``wire.CHANNELS`` so it cannot drift.

A channel registers itself when the module that declares it is imported; the imports below
are the one list of those modules. A module that declares a new channel is added here.
"""

from __future__ import annotations

# Every module that declares a wire channel (imported for that, in the order rendered):
import lmshard.backup_wire  # noqa: F401  the backup channel
import lmshard.changes_wire  # noqa: F401  the change feed channel
import lmshard.stats_wire  # noqa: F401  the stats and monitor channels
from lmshard import wire
from lmshard.errors import error_classes
from lmshard.keys import MAX_KEY_SIZE
from lmshard.protocol.commands import COMMANDS, MAX_SCAN_PAGE, REQUESTS, Command
from lmshard.protocol.frames import MAX_FRAME_SIZE, PROTOCOL_VERSION
from lmshard.protocol.ops import MAX_OPS_PER_BATCH, MAX_VALUE_SIZE
from lmshard.unix_wire import UNIX_SUFFIX


def _header() -> list[str]:
    return [
        "# lmshard wire protocol",
        "",
        "Generated from the channels declared with `lmshard.wire` by "
        "`python -m lmshard.protocol`; do not edit.",
        "",
        f"Protocol version {PROTOCOL_VERSION}. Every frame of the request channel is one "
        "ZeroMQ frame: the version byte followed by one msgpack array. Clients use a DEALER "
        "socket per shard owner; the owner a ROUTER. An owner whose endpoint is ipc also "
        "accepts the same frames on a unix stream socket at the endpoint's path + "
        f"`{UNIX_SUFFIX}` (`shard.unix_socket`), each frame behind its length (4 bytes, big "
        "endian), and answers each on the same connection.",
        "",
        "- request: `[command code, client id (16 bytes or nil), sequence number, body]`",
        "- reply: `[sequence number, status, body]`; status 0 is success, otherwise an error "
        "code from the table below and the body is `[message, hint]`.",
        "",
        f"Limits: frame {MAX_FRAME_SIZE // 2**20} MiB, {MAX_OPS_PER_BATCH:,} ops per batch, "
        f"keys 1..{MAX_KEY_SIZE} bytes (LMDB's limit), values {MAX_VALUE_SIZE // 2**20} MiB, "
        f"scan pages {MAX_SCAN_PAGE:,} rows.",
        "",
    ]


def _command_section(cmd: Command) -> list[str]:
    return [
        f"### `{cmd.name}` (code {cmd.code}{', a write' if cmd.writes else ''})",
        "",
        f"- request body: `{cmd.request}`",
        *(f"  - {f.name}: {f.doc}" for f in cmd.message.fields),
        f"- reply body: `{cmd.reply}`",
        "",
        cmd.doc,
        "",
    ]


def _error_table() -> list[str]:
    lines = ["## Error codes", "", "| code | exception | meaning | hint |", "|---|---|---|---|"]
    for code, cls in sorted(error_classes().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"| {code} | `lmshard.{cls.__name__}` | {doc} | {cls.hint} |")
    return lines


ORDER = ("requests", "changes", "backup", "stats", "monitor")
"""The order channels are rendered in (whichever module a process imported first); a channel
not listed comes last."""


def render_markdown() -> str:
    """The text of docs/protocol.md."""
    lines = _header()
    order = {name: i for i, name in enumerate(ORDER)}
    for ch in sorted(wire.CHANNELS.values(), key=lambda c: order.get(c.name, len(ORDER))):
        lines.append(ch.markdown())
        if ch is REQUESTS:
            lines += ["### Commands of the request channel", ""]
            for cmd in sorted(COMMANDS.values(), key=lambda c: c.code):
                lines += _command_section(cmd)
    lines += _error_table()
    return "\n".join(lines) + "\n"
