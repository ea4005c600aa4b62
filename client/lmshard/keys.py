"""Order-preserving key encodings: LMDB's bytewise key order equals the keys' natural order.

LMDB compares keys with ``memcmp``. Every encoding here is chosen so that, for two keys of one
declared kind, ``encode(a) < encode(b)`` exactly when ``a < b``; range and prefix scans over the
raw LMDB keys then mean what they say.

Declared key kinds (``key_codec(spec)`` takes one kind, or a tuple/list of kinds):

=============  ============================================  ==================================
kind           accepts                                       encoded as
=============  ============================================  ==================================
``uint64``     int in [0, 2**64-1] (not bool)                8 bytes big-endian
``int64``      int in [-2**63, 2**63-1] (not bool)           8 bytes big-endian of value + 2**63
``uuid``       uuid.UUID, or a str ``uuid.UUID()`` parses    16 bytes (``UUID.bytes``)
``str``        non-empty str                                 UTF-8 (byte order = code point order)
``bytes``      non-empty bytes, bytearray or memoryview      as is
``timestamp``  int nanoseconds since the epoch, or a         like int64, so pre-1970 sorts first;
               datetime.datetime (naive means UTC)           decodes to int nanoseconds
=============  ============================================  ==================================

A tuple key concatenates its elements' encodings. Fixed-width elements need no delimiter. A str or
bytes element that is not the last one is escaped so that it contains no 0x00 byte (0x00 becomes
0x01 0x01 and 0x01 becomes 0x01 0x02; order is kept since 01 01 < 01 02 < 02) and terminated with
a single 0x00; the last element is written raw.

Why not FoundationDB's escaping (0x00 -> 0x00 0xFF, terminator 0x00): there a terminator can also
be the first byte of an escaped NUL, which breaks two things. (1) Declared keys carry no type codes,
so the next element may start with 0xFF: ``(b"\\x00", b"")`` and ``(b"", b"\\xff\\x00")`` would
both encode to 00 FF 00, and ``(b"", 2**64-1)`` would sort after ``(b"\\x00", 0)``. (2) Prefix
scans: the prefix of ``("a",)`` would be 61 00, which ``("a\\x00", ...)`` (61 00 FF ...) also
starts with (FoundationDB scans the range [prefix 00, prefix FF) rather than "starts with"). With
no 0x00 inside an escaped body, the terminator is unambiguous and sorts below every body byte
whatever follows it, so order, decoding and "starts with the prefix" all hold, and dropping the
terminator still leaves a string prefix.

LMDB keys are 1..511 bytes (511 is LMDB's compile-time maximum key size), so ``encode`` rejects an
empty or longer encoding; a tuple of fixed-width kinds longer than 511 bytes is a SchemaError.

``decode`` trusts its input (bytes that ``encode`` produced): fixed-width scalar kinds do not check
the length, to keep the hot path as cheap as ``int.from_bytes``.

Secondary index values (``encode_index_value``) are dynamically typed: each element is a tag byte
and an order-preserving body, FoundationDB-tuple-layer style. Across types the order is by tag::

    None < False < True < int < float < str < bytes < uuid.UUID < datetime.datetime

so ``1`` and ``1.0`` (and ``True`` and ``1``) are different index values, and all ints sort before
all floats. Within a type the order is Python's: ints are int64; floats use the IEEE-754 trick
(flip all bits of a negative, flip the sign bit of a positive), -0.0 is stored as 0.0 and every NaN
as one NaN that sorts after +inf; str and bytes are escaped and terminated with 0x00 as in tuple
keys, but always, even when last. Datetimes are stored as int64 microseconds since the epoch
in UTC (a naive datetime means UTC; the full datetime range fits) and decode to aware UTC datetimes.

A tuple (or list) index value is the concatenation of its elements' encodings. There is no tuple
marker: a scalar ``v`` and the 1-tuple ``(v,)`` encode the same, and ``decode_index_value`` returns
the scalar for one element and a tuple for two or more. Nested tuples are rejected.
``encode_index_prefix(t)`` is the encoding of the tuple ``t``'s elements: exactly the index values
whose leading elements equal ``t`` start with it. ``encode_index_prefix(s)`` for a str or bytes
``s`` (not in a tuple) is a string prefix: the encoding without its terminator, which the values
(or first elements) that are strings starting with ``s`` start with.
"""

from __future__ import annotations

import datetime as _dt
import operator
import struct
import uuid
from collections.abc import Callable
from typing import Any

from lmshard.errors import KeyEncodingError, SchemaError

__all__ = [
    "KEY_KINDS",
    "MAX_KEY_SIZE",
    "KeyCodec",
    "decode_index_value",
    "encode_index_prefix",
    "encode_index_value",
    "key_codec",
]

KEY_KINDS: tuple[str, ...] = ("uuid", "str", "uint64", "int64", "bytes", "timestamp")

MAX_KEY_SIZE = 511
"""LMDB's compile-time maximum key size (``mdb_env_get_maxkeysize``) in bytes."""

_UINT64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_SIGN = 1 << 63  # added to an int64 so that negatives sort first (flips the sign bit)
_ALL_ONES = (1 << 64) - 1

_TERMINATOR = b"\x00"  # ends an escaped str/bytes element, which contains no 0x00

_UTC = _dt.UTC
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_EPOCH_NAIVE = _dt.datetime(1970, 1, 1)
_ONE_MICROSECOND = _dt.timedelta(microseconds=1)

_TOO_LONG_HINT = (
    "hash long keys (e.g. hashlib.blake2b(key, digest_size=32).digest() as a 'bytes' key) or use "
    "a uint64/uuid surrogate key and keep the long value in the row"
)


# --- helpers -------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short repr of ``value`` with its type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _size_error(what: str, data: bytes) -> KeyEncodingError:
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


def _escape(raw: bytes) -> bytes:
    """Escape a str/bytes element (00 -> 01 01, 01 -> 01 02) and terminate it with 00."""
    return raw.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01") + _TERMINATOR


def _read_escaped(data: bytes, pos: int) -> tuple[bytes, int]:
    """Read an escaped, terminated element at ``pos``: (unescaped body, position after it)."""
    end = data.find(_TERMINATOR, pos)  # an escaped body has no 00: the first 00 ends it
    if end < 0:
        raise _malformed(data, "a str/bytes element has no terminator")
    # 01 is always the first byte of a 2-byte escape, so these left-to-right scans stay aligned
    return data[pos:end].replace(b"\x01\x01", b"\x00").replace(b"\x01\x02", b"\x01"), end + 1


def _malformed(data: bytes | memoryview, why: str) -> KeyEncodingError:
    return KeyEncodingError(
        f"malformed encoded key or index value {bytes(data)[:40].hex()}: {why}",
        hint="pass bytes produced by this module's encoders",
    )


_RANGES = {"uint64": "[0, 2**64-1]", "int64": "[-2**63, 2**63-1]", "timestamp": "int64 range"}


def _as_int(value: Any, kind: str, low: int, high: int) -> int:
    """Validate and convert an int-like key (slow path of the int kinds); reject bool and float."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise KeyEncodingError(
            f"{kind} key must be an int, got {_show(value)}",
            hint=f"pass an int in {_RANGES[kind]}",
        )
    number = operator.index(value)
    if not low <= number <= high:
        raise KeyEncodingError(
            f"{kind} key {number} is out of range {_RANGES[kind]}",
            hint=f"pass an int in {_RANGES[kind]}",
        )
    return number


def _datetime_micros(value: _dt.datetime) -> int:
    """Microseconds since 1970-01-01 UTC; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        return (value - _EPOCH_NAIVE) // _ONE_MICROSECOND
    try:
        return (value - _EPOCH) // _ONE_MICROSECOND
    except TypeError:  # a tzinfo whose utcoffset() is None still means naive
        return (value.replace(tzinfo=None) - _EPOCH_NAIVE) // _ONE_MICROSECOND


# --- scalar kinds: one encoder and one decoder each ----------------------------------------------
# Each encoder has a fast path for the exact expected type and falls back to a validating slow path.


def _enc_uint64(key: Any) -> bytes:
    if type(key) is int:
        try:
            return key.to_bytes(8, "big")  # OverflowError for negatives and >= 2**64
        except OverflowError:
            pass
    return _as_int(key, "uint64", 0, _UINT64_MAX).to_bytes(8, "big")


def _dec_uint64(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _enc_int64(key: Any) -> bytes:
    if type(key) is int:
        try:
            return (key + _SIGN).to_bytes(8, "big")
        except OverflowError:
            pass
    return (_as_int(key, "int64", _INT64_MIN, _INT64_MAX) + _SIGN).to_bytes(8, "big")


def _dec_int64(data: bytes) -> int:
    return int.from_bytes(data, "big") - _SIGN


def _enc_timestamp(key: Any) -> bytes:
    if type(key) is int:
        try:
            return (key + _SIGN).to_bytes(8, "big")
        except OverflowError:
            pass
    elif isinstance(key, _dt.datetime):
        nanos = _datetime_micros(key) * 1000
        if not _INT64_MIN <= nanos <= _INT64_MAX:
            raise KeyEncodingError(
                f"timestamp key {key.isoformat()} does not fit int64 nanoseconds "
                f"(years 1677 to 2262)",
                hint="pass a datetime between 1677-09-22 and 2262-04-11, or use an int64 key",
            )
        return (nanos + _SIGN).to_bytes(8, "big")
    if isinstance(key, bool) or not hasattr(type(key), "__index__"):
        raise KeyEncodingError(
            f"timestamp key must be int nanoseconds since the epoch or a datetime.datetime, "
            f"got {_show(key)}",
            hint="pass time.time_ns() style ints, or a timezone-aware datetime",
        )
    return (_as_int(key, "timestamp", _INT64_MIN, _INT64_MAX) + _SIGN).to_bytes(8, "big")


_UUID = uuid.UUID


def _coerce_uuid(key: Any) -> uuid.UUID:
    if isinstance(key, uuid.UUID):
        return key
    if isinstance(key, str):
        try:
            return uuid.UUID(key)
        except ValueError:
            raise KeyEncodingError(
                f"uuid key {_show(key)} is not a valid UUID string",
                hint="pass a uuid.UUID or a canonical UUID string like "
                "'12345678-1234-5678-1234-567812345678'",
            ) from None
    raise KeyEncodingError(
        f"uuid key must be a uuid.UUID or a UUID string, got {_show(key)}",
        hint="pass a uuid.UUID",
    )


def _enc_uuid(key: Any) -> bytes:
    if type(key) is _UUID:
        return key.int.to_bytes(16, "big")
    return _coerce_uuid(key).int.to_bytes(16, "big")


def _dec_uuid_portable(data: bytes) -> uuid.UUID:
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
        return _dec_uuid_portable
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
    return _dec_uuid_portable  # pragma: no cover


_dec_uuid = _make_uuid_decoder()


def _enc_str(key: Any) -> bytes:
    if isinstance(key, str):
        try:
            return key.encode()
        except UnicodeEncodeError:
            raise KeyEncodingError(
                f"str key {_show(key)} is not encodable as UTF-8 (lone surrogate?)",
                hint="pass a str of valid Unicode code points",
            ) from None
    raise KeyEncodingError(
        f"str key must be a str, got {_show(key)}", hint="pass a str (or declare a 'bytes' key)"
    )


def _dec_str(data: bytes) -> str:
    return str(data, "utf-8")


def _enc_bytes(key: Any) -> bytes:
    if type(key) is bytes:
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise KeyEncodingError(
        f"bytes key must be bytes, bytearray or memoryview, got {_show(key)}",
        hint="pass bytes (or declare a 'str' key)",
    )


def _dec_bytes(data: bytes) -> bytes:
    return bytes(data)


def _identity(value: Any) -> Any:
    return value


# kind -> (encoder, decoder, fixed width or None, to_json of a decoded value)
_KINDS: dict[str, tuple[Callable[[Any], bytes], Callable[[Any], Any], int | None, Callable]] = {
    "uint64": (_enc_uint64, _dec_uint64, 8, _identity),
    "int64": (_enc_int64, _dec_int64, 8, _identity),
    "timestamp": (_enc_timestamp, _dec_int64, 8, _identity),
    "uuid": (_enc_uuid, _dec_uuid, 16, str),
    "str": (_enc_str, _dec_str, None, _identity),
    "bytes": (_enc_bytes, _dec_bytes, None, bytes.hex),
}
assert tuple(sorted(_KINDS)) == tuple(sorted(KEY_KINDS))


# --- KeyCodec ------------------------------------------------------------------------------------


class KeyCodec:
    """The encode/decode pair for one declared key kind, specialised once per table.

    ``encode`` and ``decode`` are plain functions stored on the instance (call them as
    ``codec.encode(key)``), built for the declared kind so the hot path does no kind dispatch.
    """

    __slots__ = ("spec", "encode", "decode", "_prefix", "_json", "any_width")

    spec: str | tuple[str, ...]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes | memoryview], Any]
    any_width: int | None
    """When every byte string of this length is a canonical key (``encode(decode(b)) == b``):
    the kind's fixed width, 0 for a scalar ``bytes`` key (any 1..511 bytes), None when a key's
    bytes must be decoded and re-encoded to know. The shard owner's fast path."""

    def __init__(
        self,
        spec: str | tuple[str, ...],
        encode: Callable[[Any], bytes],
        decode: Callable[[Any], Any],
        prefix: Callable[[Any], bytes],
        json: Callable[[Any], Any],
        any_width: int | None = None,
    ) -> None:
        self.spec = spec
        self.encode = encode
        self.decode = decode
        self._prefix = prefix
        self._json = json
        self.any_width = any_width

    def encode_prefix(self, prefix: Any) -> bytes:
        """The bytes every encoded key "starting with" ``prefix`` begins with (for prefix scans).

        str key: a str prefix (string prefix scan). bytes key: a bytes prefix. Fixed-width scalar
        kinds: a full key (same as ``encode``). Tuple key: a tuple of the first 1..n elements (a
        scalar counts as a 1-tuple, ``()`` gives ``b""``); with fewer than n elements it matches
        exactly the keys whose leading elements equal it; with all n, the last element acts as its
        kind's scalar prefix (a string/bytes prefix for str/bytes, the exact value otherwise).
        """
        return self._prefix(prefix)

    def to_json(self, key: Any) -> Any:
        """A JSON-safe form of ``key`` for debugging: uuid -> str, bytes -> hex, tuple -> list."""
        return self._json(self.decode(self.encode(key)))

    def __repr__(self) -> str:
        return f"KeyCodec({self.spec!r})"


def key_codec(spec: str | tuple[str, ...] | list[str]) -> KeyCodec:
    """Build the codec for a declared key kind or tuple of kinds; SchemaError if it is invalid."""
    if isinstance(spec, str):
        return _scalar_codec(_check_kind(spec, spec))
    if not isinstance(spec, (tuple, list)) or not spec:
        raise SchemaError(
            f"key kind must be a kind name or a non-empty tuple of kind names, got {spec!r}",
            hint=f"use one of {', '.join(KEY_KINDS)}, or a tuple of them",
        )
    return _tuple_codec(tuple(_check_kind(kind, spec) for kind in spec))


def _check_kind(kind: Any, spec: Any) -> str:
    if kind not in _KINDS:
        raise SchemaError(
            f"unknown key kind {kind!r} in key declaration {spec!r}",
            hint=f"valid key kinds are {', '.join(KEY_KINDS)} (or a tuple of them)",
        )
    return kind


def _scalar_codec(kind: str) -> KeyCodec:
    enc, dec, width, json = _KINDS[kind]
    if width is not None:  # never empty, never too long: the kind's encoder is the whole encode
        return KeyCodec(kind, enc, dec, enc, json, width)

    what = f"{kind} key"

    def encode(key: Any) -> bytes:
        data = enc(key)
        if 0 < len(data) <= MAX_KEY_SIZE:
            return data
        raise _size_error(what, data)

    encode.__doc__ = f"Encode a {kind} key; KeyEncodingError if empty or over 511 bytes."
    # A prefix may be empty (scan everything); it is not checked against the key size limit.
    return KeyCodec(kind, encode, dec, enc, json, 0 if kind == "bytes" else None)


def _tuple_codec(kinds: tuple[str, ...]) -> KeyCodec:
    n = len(kinds)
    encoders: list[Callable[[Any], bytes]] = []
    for i, kind in enumerate(kinds):
        enc, _, width, _ = _KINDS[kind]
        if width is None and i < n - 1:
            encoders.append(_escaping(enc))
        else:
            encoders.append(enc)
    widths = [_KINDS[kind][2] for kind in kinds]
    fixed_size = sum(w for w in widths if w is not None)
    if None not in widths and fixed_size > MAX_KEY_SIZE:
        raise SchemaError(
            f"key {kinds!r} always encodes to {fixed_size} bytes, more than LMDB's "
            f"{MAX_KEY_SIZE}-byte maximum key size",
            hint="use fewer key elements, or a uint64/uuid surrogate key",
        )
    variable = None in widths
    what = f"{kinds!r} key"
    pairs = tuple(zip(kinds, encoders, strict=True))

    def fail(key: Any) -> KeyEncodingError:
        """Find and explain what is wrong with ``key`` (slow path, only after a failure)."""
        if not isinstance(key, (tuple, list)):
            return KeyEncodingError(
                f"{what} must be a tuple of {n} elements, got {_show(key)}",
                hint=f"pass a tuple like ({', '.join(kinds)})",
            )
        if len(key) != n:
            return KeyEncodingError(
                f"{what} must have {n} elements, got {len(key)}: {_show(key)}",
                hint=f"pass a tuple like ({', '.join(kinds)})",
            )
        return _element_error(pairs, key, what)

    if n == 2:  # the common composite key: skip the join machinery
        enc0, enc1 = encoders

        def encode(key: Any) -> bytes:
            if (type(key) is tuple or type(key) is list) and len(key) == 2:
                try:
                    data = enc0(key[0]) + enc1(key[1])
                except KeyEncodingError:
                    raise fail(key) from None
                if not variable or len(data) <= MAX_KEY_SIZE:
                    return data
                raise _size_error(what, data)
            raise fail(key)

    else:

        def encode(key: Any) -> bytes:
            if isinstance(key, (tuple, list)) and len(key) == n:
                try:
                    data = b"".join([f(v) for f, v in zip(encoders, key, strict=True)])
                except KeyEncodingError:
                    raise fail(key) from None
                if not variable or 0 < len(data) <= MAX_KEY_SIZE:
                    return data
                raise _size_error(what, data)
            raise fail(key)

    def encode_prefix(prefix: Any) -> bytes:
        if not isinstance(prefix, (tuple, list)):
            prefix = (prefix,)
        if len(prefix) > n:
            raise KeyEncodingError(
                f"prefix {_show(prefix)} has more elements than the {what}",
                hint=f"pass at most {n} leading elements",
            )
        try:
            return b"".join([f(v) for f, v in zip(encoders, prefix, strict=False)])
        except KeyEncodingError:
            raise _element_error(pairs, prefix, f"prefix of the {what}") from None

    decode = _tuple_decoder(kinds)
    jsons = [_KINDS[kind][3] for kind in kinds]

    def to_json(key: tuple) -> list:
        return [f(v) for f, v in zip(jsons, key, strict=True)]

    encode.__doc__ = f"Encode a {kinds!r} key; KeyEncodingError if malformed or over 511 bytes."
    return KeyCodec(kinds, encode, decode, encode_prefix, to_json,
                    None if variable else fixed_size)


def _escaping(enc: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """Wrap a str/bytes encoder for a non-last tuple element: escape and terminate."""

    def encode(value: Any) -> bytes:  # _escape, inlined: this is on the hot path
        return enc(value).replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01") + b"\x00"

    return encode


def _element_error(pairs: tuple, key: Any, what: str) -> KeyEncodingError:
    for i, ((kind, enc), value) in enumerate(zip(pairs, key, strict=False)):
        try:
            enc(value)
        except KeyEncodingError as exc:
            return KeyEncodingError(f"element {i} ({kind}) of {what}: {exc.message}", hint=exc.hint)
    return KeyEncodingError(f"invalid {what}: {_show(key)}")  # pragma: no cover


def _tuple_decoder(kinds: tuple[str, ...]) -> Callable[[bytes | memoryview], tuple]:
    decoders = [_KINDS[kind][1] for kind in kinds]
    widths = [_KINDS[kind][2] for kind in kinds]

    if None not in widths:  # all fixed width: slice at precomputed offsets
        total = sum(w for w in widths if w is not None)
        if len(kinds) == 2:
            dec0, dec1 = decoders
            cut = widths[0]

            def decode_pair(data: bytes | memoryview) -> tuple:
                if len(data) != total:
                    raise _malformed(data, f"expected {total} bytes, got {len(data)}")
                return (dec0(data[:cut]), dec1(data[cut:]))

            return decode_pair

        slices = []
        start = 0
        for dec, width in zip(decoders, widths, strict=True):
            assert width is not None
            slices.append((dec, start, start + width))
            start += width

        def decode_fixed(data: bytes | memoryview) -> tuple:
            if len(data) != total:
                raise _malformed(data, f"expected {total} bytes, got {len(data)}")
            return tuple([dec(data[a:b]) for dec, a, b in slices])

        return decode_fixed

    head = list(zip(decoders[:-1], widths[:-1], strict=True))
    last_dec, last_width = decoders[-1], widths[-1]

    def decode(data: bytes | memoryview) -> tuple:
        data = bytes(data)
        out = []
        pos = 0
        for dec, width in head:
            if width is None:
                body, pos = _read_escaped(data, pos)
                out.append(dec(body))
            else:
                out.append(dec(data[pos : pos + width]))
                pos += width
        if last_width is not None and len(data) - pos != last_width:
            raise _malformed(data, f"last element should be {last_width} bytes")
        out.append(last_dec(data[pos:]))
        return tuple(out)

    return decode


# --- dynamic, type-tagged index values -----------------------------------------------------------

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
_DATETIME_MIN_US = _datetime_micros(_dt.datetime.min)
_DATETIME_MAX_US = _datetime_micros(_dt.datetime.max)


def _ix_int(value: int) -> bytes:
    try:
        return _INT_B + (value + _SIGN).to_bytes(8, "big")
    except OverflowError:
        raise KeyEncodingError(
            f"index value {value} is outside the int64 range [{_INT64_MIN}, {_INT64_MAX}]",
            hint="return an int64 from the index function, or a str/bytes form of big numbers",
        ) from None


def _ix_float(value: float) -> bytes:
    if value != value:
        bits = _CANONICAL_NAN  # every NaN is one value, after +inf
    else:
        bits = int.from_bytes(_pack_double(value + 0.0), "big")  # + 0.0 turns -0.0 into 0.0
    bits = bits ^ _ALL_ONES if bits >> 63 else bits | _SIGN
    return _FLOAT_B + bits.to_bytes(8, "big")


def _ix_str(value: str) -> bytes:
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise KeyEncodingError(
            f"index value {_show(value)} is not encodable as UTF-8 (lone surrogate?)",
            hint="return a str of valid Unicode code points",
        ) from None
    return _STR_B + _escape(raw)


def _ix_bytes(value: bytes) -> bytes:
    return _BYTES_B + _escape(bytes(value))


def _ix_uuid(value: uuid.UUID) -> bytes:
    return _UUID_B + value.int.to_bytes(16, "big")


def _ix_datetime(value: _dt.datetime) -> bytes:
    micros = _datetime_micros(value)
    if not _DATETIME_MIN_US <= micros <= _DATETIME_MAX_US:
        raise KeyEncodingError(
            f"index value {value.isoformat()} is outside datetime's range once converted to UTC",
            hint="pass a datetime whose UTC time is between years 1 and 9999",
        )
    return _DATETIME_B + (micros + _SIGN).to_bytes(8, "big")


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
            f"nested tuples are not supported in index values: {_show(value)}",
            hint="flatten the tuple the index function returns",
        )
    raise KeyEncodingError(
        f"unsupported index value type: {_show(value)}",
        hint="return None, bool, int, float, str, bytes, uuid.UUID, datetime.datetime "
        "or a tuple of those from the index function",
    )


def encode_index_value(value: Any) -> bytes:
    """Encode a secondary-index value (scalar or flat tuple) so bytewise order = Python order.

    A scalar and its 1-tuple encode the same; see the module docstring for the tag order.
    """
    t = type(value)
    if t is tuple or t is list:
        if not value:
            raise KeyEncodingError(
                "index value is an empty tuple", hint="return a non-empty tuple, or None"
            )
        data = b"".join(map(_ix_element, value))
    else:
        data = _ix_element(value)
    if len(data) > MAX_KEY_SIZE:
        raise _size_error("index value", data)
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
        raise _malformed(data, f"truncated {width}-byte element at byte {pos}")
    return chunk


def _rd_int(data: bytes, pos: int) -> tuple[Any, int]:
    return int.from_bytes(_rd_fixed(data, pos, 8), "big") - _SIGN, pos + 8


def _rd_float(data: bytes, pos: int) -> tuple[Any, int]:
    bits = int.from_bytes(_rd_fixed(data, pos, 8), "big")
    bits = bits ^ _SIGN if bits >> 63 else bits ^ _ALL_ONES
    return _unpack_double(bits.to_bytes(8, "big"))[0], pos + 8


def _rd_str(data: bytes, pos: int) -> tuple[Any, int]:
    body, pos = _read_escaped(data, pos)
    return body.decode(), pos


def _rd_uuid(data: bytes, pos: int) -> tuple[Any, int]:
    return _dec_uuid(_rd_fixed(data, pos, 16)), pos + 16


def _rd_datetime(data: bytes, pos: int) -> tuple[Any, int]:
    micros = int.from_bytes(_rd_fixed(data, pos, 8), "big") - _SIGN
    return _EPOCH + _dt.timedelta(microseconds=micros), pos + 8


_IX_READERS: dict[int, Callable[[bytes, int], tuple[Any, int]]] = {
    _TAG_NONE: lambda data, pos: (None, pos),
    _TAG_FALSE: lambda data, pos: (False, pos),
    _TAG_TRUE: lambda data, pos: (True, pos),
    _TAG_INT: _rd_int,
    _TAG_FLOAT: _rd_float,
    _TAG_STR: _rd_str,
    _TAG_BYTES: _read_escaped,
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
            raise _malformed(data, f"unknown type tag 0x{data[pos]:02x} at byte {pos}")
        value, pos = reader(data, pos + 1)
        items.append(value)
    if not items:
        raise _malformed(data, "empty")
    return items[0] if len(items) == 1 else tuple(items)
