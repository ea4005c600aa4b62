"""Secondary-index values: dynamically typed, type-tagged, order-preserving bytes.

An index function may return values of any of several types, so each element is a tag byte and
an order-preserving body, FoundationDB-tuple-layer style. Across types the order is by tag::

    None < False < True < int < float < str < bytes < uuid.UUID < datetime.datetime

so ``1`` and ``1.0`` (and ``True`` and ``1``) are different index values, and all ints sort before
all floats. Within a type the order is Python's: ints are int64; floats use the IEEE-754 trick
(flip all bits of a negative, flip the sign bit of a positive), -0.0 is stored as 0.0 and every NaN
as one NaN that sorts after +inf; str and bytes are escaped and terminated with 0x00 as in tuple
keys (see ``lmshard.keys``), but always, even when last. Datetimes are stored as int64
microseconds since the epoch in UTC (a naive datetime means UTC; the full datetime range fits) and
decode to aware UTC datetimes.

A tuple (or list) index value is the concatenation of its elements' encodings. There is no tuple
marker: a scalar ``v`` and the 1-tuple ``(v,)`` encode the same, and ``decode_index_value`` returns
the scalar for one element and a tuple for two or more. Nested tuples are rejected.
``encode_index_prefix(t)`` is the encoding of the tuple ``t``'s elements: exactly the index values
whose leading elements equal ``t`` start with it. ``encode_index_prefix(s)`` for a str or bytes
``s`` (not in a tuple) is a string prefix: the encoding without its terminator, which the values
(or first elements) that are strings starting with ``s`` start with.

An encoded index value is an LMDB key of the index database, so it is at most 511 bytes.
"""

from __future__ import annotations

import datetime as _dt
import struct
import uuid
from collections.abc import Callable
from typing import Any

from lmshard.errors import KeyEncodingError
from lmshard.key_bytes import (
    EPOCH,
    INT64_MAX,
    INT64_MIN,
    MAX_KEY_SIZE,
    SIGN,
    datetime_micros,
    decode_uuid,
    escape,
    malformed,
    read_escaped,
    show,
    size_error,
)

__all__ = [
    "decode_index_value",
    "encode_index_prefix",
    "encode_index_value",
    "index_prefix",
]

_ALL_ONES = (1 << 64) - 1

_TAG_NONE = 0x10
_TAG_FALSE = 0x20
_TAG_TRUE = 0x21
_TAG_INT = 0x30
_TAG_FLOAT = 0x40
_TAG_STR = 0x50
_TAG_BYTES = 0x60
_TAG_UUID = 0x70
_TAG_DATETIME = 0x80

_NONE_B = bytes([_TAG_NONE])
_FALSE_B = bytes([_TAG_FALSE])
_TRUE_B = bytes([_TAG_TRUE])
_INT_B = bytes([_TAG_INT])
_FLOAT_B = bytes([_TAG_FLOAT])
_STR_B = bytes([_TAG_STR])
_BYTES_B = bytes([_TAG_BYTES])
_UUID_B = bytes([_TAG_UUID])
_DATETIME_B = bytes([_TAG_DATETIME])

_CANONICAL_NAN = 0x7FF8_0000_0000_0000
_pack_double = struct.Struct(">d").pack
_unpack_double = struct.Struct(">d").unpack
_DATETIME_MIN_US = datetime_micros(_dt.datetime.min)
_DATETIME_MAX_US = datetime_micros(_dt.datetime.max)


def _ix_int(value: int) -> bytes:
    try:
        return _INT_B + (value + SIGN).to_bytes(8, "big")
    except OverflowError:
        raise KeyEncodingError(
            f"index value {value} is outside the int64 range [{INT64_MIN}, {INT64_MAX}]",
            hint="return an int64 from the index function, or a str/bytes form of big numbers",
        ) from None


def _ix_float(value: float) -> bytes:
    if value != value:
        bits = _CANONICAL_NAN  # every NaN is one value, after +inf
    else:
        bits = int.from_bytes(_pack_double(value + 0.0), "big")  # + 0.0 turns -0.0 into 0.0
    bits = bits ^ _ALL_ONES if bits >> 63 else bits | SIGN
    return _FLOAT_B + bits.to_bytes(8, "big")


def _ix_str(value: str) -> bytes:
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise KeyEncodingError(
            f"index value {show(value)} is not encodable as UTF-8 (lone surrogate?)",
            hint="return a str of valid Unicode code points",
        ) from None
    return _STR_B + escape(raw)


def _ix_bytes(value: bytes) -> bytes:
    return _BYTES_B + escape(bytes(value))


def _ix_uuid(value: uuid.UUID) -> bytes:
    return _UUID_B + value.int.to_bytes(16, "big")


def _ix_datetime(value: _dt.datetime) -> bytes:
    micros = datetime_micros(value)
    if not _DATETIME_MIN_US <= micros <= _DATETIME_MAX_US:
        raise KeyEncodingError(
            f"index value {value.isoformat()} is outside datetime's range once converted to UTC",
            hint="pass a datetime whose UTC time is between years 1 and 9999",
        )
    return _DATETIME_B + (micros + SIGN).to_bytes(8, "big")


def _ix_bool(value: bool) -> bytes:
    return _TRUE_B if value else _FALSE_B


def _ix_none(value: None) -> bytes:
    return _NONE_B


_IX_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    type(None): _ix_none,
    bool: _ix_bool,
    int: _ix_int,
    float: _ix_float,
    str: _ix_str,
    bytes: _ix_bytes,
    bytearray: _ix_bytes,
    memoryview: _ix_bytes,
    uuid.UUID: _ix_uuid,
    _dt.datetime: _ix_datetime,
}
# Subclasses (IntEnum, str enums, datetime subclasses, ...), checked in this order: bool before int.
_IX_BASES: tuple[tuple[type | tuple[type, ...], Callable[[Any], bytes]], ...] = (
    (bool, _ix_bool),
    (int, _ix_int),
    (float, _ix_float),
    (str, _ix_str),
    ((bytes, bytearray, memoryview), _ix_bytes),
    (uuid.UUID, _ix_uuid),
    (_dt.datetime, _ix_datetime),
)


def _ix_element(value: Any) -> bytes:
    """Encode one scalar element of an index value: tag byte + order-preserving body."""
    enc = _IX_ENCODERS.get(type(value))
    if enc is not None:
        return enc(value)
    for base, enc in _IX_BASES:
        if isinstance(value, base):
            return enc(value)
    if isinstance(value, (tuple, list)):
        raise KeyEncodingError(
            f"nested tuples are not supported in index values: {show(value)}",
            hint="flatten the tuple the index function returns",
        )
    raise KeyEncodingError(
        f"unsupported index value type: {show(value)}",
        hint="return None, bool, int, float, str, bytes, uuid.UUID, datetime.datetime "
        "or a tuple of those from the index function",
    )


def encode_index_value(value: Any) -> bytes:
    """Encode a secondary-index value (scalar or flat tuple) so bytewise order = Python order.

    A scalar and its 1-tuple encode the same; see the module docstring for the tag order.
    """
    t = type(value)
    enc = _IX_ENCODERS.get(t)  # a scalar of an exact type: its encoder, one lookup away
    if enc is not None:
        data = enc(value)
    elif t is tuple or t is list:
        if not value:
            raise KeyEncodingError(
                "index value is an empty tuple", hint="return a non-empty tuple, or None"
            )
        data = b"".join(map(_ix_element, value))
    else:
        data = _ix_element(value)
    if len(data) > MAX_KEY_SIZE:
        raise size_error("index value", data)
    return data


def encode_index_prefix(prefix: Any) -> bytes:
    """Bytes for an index prefix lookup (``startswith``, or the range [prefix, successor)).

    A tuple/list: exactly the values whose first ``len(prefix)`` elements equal it start with
    these bytes (``()`` gives ``b""``). A str or bytes: a string prefix, matching str/bytes values
    (or first elements) that start with it. Any other scalar: the same as a 1-tuple.
    """
    if type(prefix) is tuple or type(prefix) is list:
        return b"".join(map(_ix_element, prefix))
    encoded = _ix_element(prefix)
    if encoded[0] == _TAG_STR or encoded[0] == _TAG_BYTES:
        return encoded[:-1]  # drop the terminator: a string prefix
    return encoded


def _rd_fixed(data: bytes, pos: int, width: int) -> bytes:
    chunk = data[pos : pos + width]
    if len(chunk) != width:
        raise malformed(data, f"truncated {width}-byte element at byte {pos}")
    return chunk


def _rd_int(data: bytes, pos: int) -> tuple[Any, int]:
    return int.from_bytes(_rd_fixed(data, pos, 8), "big") - SIGN, pos + 8


def _rd_float(data: bytes, pos: int) -> tuple[Any, int]:
    bits = int.from_bytes(_rd_fixed(data, pos, 8), "big")
    bits = bits ^ SIGN if bits >> 63 else bits ^ _ALL_ONES
    return _unpack_double(bits.to_bytes(8, "big"))[0], pos + 8


def _rd_str(data: bytes, pos: int) -> tuple[Any, int]:
    body, pos = read_escaped(data, pos)
    return body.decode(), pos


def _rd_uuid(data: bytes, pos: int) -> tuple[Any, int]:
    return decode_uuid(_rd_fixed(data, pos, 16)), pos + 16


def _rd_datetime(data: bytes, pos: int) -> tuple[Any, int]:
    micros = int.from_bytes(_rd_fixed(data, pos, 8), "big") - SIGN
    return EPOCH + _dt.timedelta(microseconds=micros), pos + 8


_IX_READERS: dict[int, Callable[[bytes, int], tuple[Any, int]]] = {
    _TAG_NONE: lambda data, pos: (None, pos),
    _TAG_FALSE: lambda data, pos: (False, pos),
    _TAG_TRUE: lambda data, pos: (True, pos),
    _TAG_INT: _rd_int,
    _TAG_FLOAT: _rd_float,
    _TAG_STR: _rd_str,
    _TAG_BYTES: read_escaped,
    _TAG_UUID: _rd_uuid,
    _TAG_DATETIME: _rd_datetime,
}


def decode_index_value(data: bytes | memoryview) -> Any:
    """Decode ``encode_index_value`` output: a scalar for one element, else a tuple."""
    data = bytes(data)
    items = []
    pos = 0
    size = len(data)
    while pos < size:
        reader = _IX_READERS.get(data[pos])
        if reader is None:
            raise malformed(data, f"unknown type tag 0x{data[pos]:02x} at byte {pos}")
        value, pos = reader(data, pos + 1)
        items.append(value)
    if not items:
        raise malformed(data, "empty")
    return items[0] if len(items) == 1 else tuple(items)


def index_prefix(value: Any) -> bytes:
    """Encoded prefix for an index lookup by prefix (``lookup(..., prefix=True)``): a tuple's
    leading elements, or the beginning of a str/bytes value."""
    if isinstance(value, tuple | list):
        return encode_index_prefix(tuple(value))
    full = encode_index_value(value)
    if isinstance(value, str | bytes):
        return full[:-1]  # drop the terminator: a string prefix, not a whole string
    return full
