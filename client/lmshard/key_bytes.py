"""Byte-level pieces shared by the key encodings (``lmshard.keys``) and the secondary-index value
encoding (``lmshard.index_values``): LMDB's key size limit, the int64 sign bias, the escaped and
terminated form of a str/bytes element, datetimes as microseconds, a fast bytes -> UUID decoder,
and the error messages for bad input.

The escaping (0x00 becomes 0x01 0x01, 0x01 becomes 0x01 0x02, then a single 0x00 terminator) is
explained in ``lmshard.keys``: an escaped body holds no 0x00, so the terminator is unambiguous and
sorts below every body byte.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Callable
from typing import Any

from lmshard.errors import KeyEncodingError

MAX_KEY_SIZE = 511
"""LMDB's compile-time maximum key size (``mdb_env_get_maxkeysize``) in bytes."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
SIGN = 1 << 63
"""Added to an int64 so that negatives sort first (flips the sign bit)."""

TERMINATOR = b"\x00"
"""Ends an escaped str/bytes element, which contains no 0x00."""

EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_EPOCH_NAIVE = _dt.datetime(1970, 1, 1)
_ONE_MICROSECOND = _dt.timedelta(microseconds=1)

_TOO_LONG_HINT = (
    "hash long keys (e.g. hashlib.blake2b(key, digest_size=32).digest() as a 'bytes' key) or use "
    "a uint64/uuid surrogate key and keep the long value in the row"
)


def show(value: Any) -> str:
    """A short repr of ``value`` with its type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def size_error(what: str, data: bytes) -> KeyEncodingError:
    """The error for an encoding LMDB cannot take as a key: empty, or over 511 bytes."""
    if not data:
        return KeyEncodingError(
            f"empty {what}: LMDB does not allow zero-length keys",
            hint="pass a non-empty value",
        )
    return KeyEncodingError(
        f"encoded {what} is {len(data)} bytes, longer than {MAX_KEY_SIZE} bytes "
        f"(LMDB's compile-time maximum key size)",
        hint=_TOO_LONG_HINT,
    )


def malformed(data: bytes | memoryview, why: str) -> KeyEncodingError:
    """The error for bytes a decoder cannot read (they were not made by these encoders)."""
    return KeyEncodingError(
        f"malformed encoded key or index value {bytes(data)[:40].hex()}: {why}",
        hint="pass bytes produced by this module's encoders",
    )


def escape(raw: bytes) -> bytes:
    """Escape a str/bytes element (00 -> 01 01, 01 -> 01 02) and terminate it with 00."""
    return raw.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01") + TERMINATOR


def read_escaped(data: bytes, pos: int) -> tuple[bytes, int]:
    """Read an escaped, terminated element at ``pos``: (unescaped body, position after it)."""
    end = data.find(TERMINATOR, pos)  # an escaped body has no 00: the first 00 ends it
    if end < 0:
        raise malformed(data, "a str/bytes element has no terminator")
    # 01 is always the first byte of a 2-byte escape, so these left-to-right scans stay aligned
    return data[pos:end].replace(b"\x01\x01", b"\x00").replace(b"\x01\x02", b"\x01"), end + 1


def datetime_micros(value: _dt.datetime) -> int:
    """Microseconds since 1970-01-01 UTC; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        return (value - _EPOCH_NAIVE) // _ONE_MICROSECOND
    try:
        return (value - EPOCH) // _ONE_MICROSECOND
    except TypeError:  # a tzinfo whose utcoffset() is None still means naive
        return (value.replace(tzinfo=None) - _EPOCH_NAIVE) // _ONE_MICROSECOND


def _decode_uuid_portable(data: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=bytes(data))


def _make_uuid_decoder() -> Callable[[bytes], uuid.UUID]:
    """The fastest correct bytes -> uuid.UUID decoder on this Python.

    uuid.UUID(bytes=...) spends ~0.8 us validating its arguments; filling UUID's two slots
    directly, as unpickling does, takes a third of that. Checked here, with a fallback, in case a
    future Python changes UUID's internals.
    """
    try:
        set_int = vars(uuid.UUID)["int"].__set__
        set_is_safe = vars(uuid.UUID)["is_safe"].__set__
    except (KeyError, AttributeError):  # pragma: no cover
        return _decode_uuid_portable
    new, unknown, uuid_type = object.__new__, uuid.SafeUUID.unknown, uuid.UUID

    def dec_uuid(data: bytes) -> uuid.UUID:
        value = new(uuid_type)
        set_int(value, int.from_bytes(data, "big"))
        set_is_safe(value, unknown)
        return value

    probe = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    try:
        same = dec_uuid(probe.bytes)
        if same == probe and str(same) == str(probe) and hash(same) == hash(probe):
            return dec_uuid
    except (TypeError, AttributeError):  # pragma: no cover
        pass
    return _decode_uuid_portable  # pragma: no cover


decode_uuid = _make_uuid_decoder()
"""16 big-endian bytes -> uuid.UUID, without uuid.UUID()'s argument checks."""
