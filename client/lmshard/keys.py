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

Secondary-index values are encoded apart, with type tags: see ``lmshard.index_values``.
"""

from __future__ import annotations

import datetime as _dt
import operator
import uuid
from collections.abc import Callable
from typing import Any, cast

from lmshard.errors import KeyEncodingError, SchemaError
from lmshard.index_values import decode_index_value, encode_index_prefix, encode_index_value
from lmshard.key_bytes import (
    INT64_MAX,
    INT64_MIN,
    MAX_KEY_SIZE,
    SIGN,
    datetime_micros,
    decode_uuid,
    malformed,
    read_escaped,
    show,
    size_error,
)

__all__ = [
    "KEY_KINDS",
    "MAX_KEY_SIZE",
    "KeyCodec",
    "key_codec",
    # Index-value encoding lives in lmshard.index_values; these names stay importable from here,
    # where services and tools have always imported them.
    "decode_index_value",
    "encode_index_prefix",
    "encode_index_value",
]

KEY_KINDS: tuple[str, ...] = ("uuid", "str", "uint64", "int64", "bytes", "timestamp")

_UINT64_MAX = (1 << 64) - 1
_RANGES = {"uint64": "[0, 2**64-1]", "int64": "[-2**63, 2**63-1]", "timestamp": "int64 range"}


def _as_int(value: Any, kind: str, low: int, high: int) -> int:
    """Validate and convert an int-like key (slow path of the int kinds); reject bool and float."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise KeyEncodingError(
            f"{kind} key must be an int, got {show(value)}",
            hint=f"pass an int in {_RANGES[kind]}",
        )
    number = operator.index(value)
    if not low <= number <= high:
        raise KeyEncodingError(
            f"{kind} key {number} is out of range {_RANGES[kind]}",
            hint=f"pass an int in {_RANGES[kind]}",
        )
    return number


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
            return (key + SIGN).to_bytes(8, "big")
        except OverflowError:
            pass
    return (_as_int(key, "int64", INT64_MIN, INT64_MAX) + SIGN).to_bytes(8, "big")


def _dec_int64(data: bytes) -> int:
    return int.from_bytes(data, "big") - SIGN


def _enc_timestamp(key: Any) -> bytes:
    if type(key) is int:
        try:
            return (key + SIGN).to_bytes(8, "big")
        except OverflowError:
            pass
    elif isinstance(key, _dt.datetime):
        nanos = datetime_micros(key) * 1000
        if not INT64_MIN <= nanos <= INT64_MAX:
            raise KeyEncodingError(
                f"timestamp key {key.isoformat()} does not fit int64 nanoseconds "
                f"(years 1677 to 2262)",
                hint="pass a datetime between 1677-09-22 and 2262-04-11, or use an int64 key",
            )
        return (nanos + SIGN).to_bytes(8, "big")
    if isinstance(key, bool) or not hasattr(type(key), "__index__"):
        raise KeyEncodingError(
            f"timestamp key must be int nanoseconds since the epoch or a datetime.datetime, "
            f"got {show(key)}",
            hint="pass time.time_ns() style ints, or a timezone-aware datetime",
        )
    return (_as_int(key, "timestamp", INT64_MIN, INT64_MAX) + SIGN).to_bytes(8, "big")


_UUID = uuid.UUID


def _coerce_uuid(key: Any) -> uuid.UUID:
    if isinstance(key, uuid.UUID):
        return key
    if isinstance(key, str):
        try:
            return uuid.UUID(key)
        except ValueError:
            raise KeyEncodingError(
                f"uuid key {show(key)} is not a valid UUID string",
                hint="pass a uuid.UUID or a canonical UUID string like "
                "'12345678-1234-5678-1234-567812345678'",
            ) from None
    raise KeyEncodingError(
        f"uuid key must be a uuid.UUID or a UUID string, got {show(key)}",
        hint="pass a uuid.UUID",
    )


def _enc_uuid(key: Any) -> bytes:
    if type(key) is _UUID:
        return key.int.to_bytes(16, "big")
    return _coerce_uuid(key).int.to_bytes(16, "big")




def _enc_str(key: Any) -> bytes:
    if isinstance(key, str):
        try:
            return key.encode()
        except UnicodeEncodeError:
            raise KeyEncodingError(
                f"str key {show(key)} is not encodable as UTF-8 (lone surrogate?)",
                hint="pass a str of valid Unicode code points",
            ) from None
    raise KeyEncodingError(
        f"str key must be a str, got {show(key)}", hint="pass a str (or declare a 'bytes' key)"
    )


def _dec_str(data: bytes) -> str:
    return str(data, "utf-8")


def _enc_bytes(key: Any) -> bytes:
    if type(key) is bytes:
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise KeyEncodingError(
        f"bytes key must be bytes, bytearray or memoryview, got {show(key)}",
        hint="pass bytes (or declare a 'str' key)",
    )


def _dec_bytes(data: bytes) -> bytes:
    return bytes(data)


def _identity(value: Any) -> Any:
    return value


_Kind = tuple[Callable[[Any], bytes], Callable[[Any], Any], int | None, Callable[[Any], Any]]
"""(encoder, decoder, fixed width or None, to_json of a decoded value)"""
_KINDS: dict[str, _Kind] = {
    "uint64": (_enc_uint64, _dec_uint64, 8, _identity),
    "int64": (_enc_int64, _dec_int64, 8, _identity),
    "timestamp": (_enc_timestamp, _dec_int64, 8, _identity),
    "uuid": (_enc_uuid, decode_uuid, 16, str),
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


def key_from_text(spec: str | tuple[str, ...], text: str) -> Any:
    """A key (or key prefix) of kind ``spec`` typed as text, as on a command line; the inverse
    of ``KeyCodec.to_json``: str as is, uuid in its canonical form, bytes in hex, the int kinds
    in decimal (timestamp also as an ISO 8601 datetime). A tuple key is a JSON array of those
    (``'["s1", 2]'``; fewer elements for a prefix), or one element's text for its first element.
    KeyEncodingError says what was expected."""
    if isinstance(spec, str):
        return _scalar_from_text(spec, text)
    if not text.startswith("["):
        try:
            return (_scalar_from_text(spec[0], text),)
        except KeyEncodingError as exc:
            raise KeyEncodingError(f"{exc.message}: the first element of a {spec!r} key",
                                   hint=f"or write the key as a JSON array like "
                                   f"{_example(spec)}") from None
    import json

    try:
        items = json.loads(text)
    except ValueError:
        items = None
    if not isinstance(items, list) or len(items) > len(spec):
        raise KeyEncodingError(
            f"{text!r} is not a JSON array of at most {len(spec)} elements",
            hint=f"write the key as a JSON array like {_example(spec)}")
    return tuple(v if isinstance(v, int) and kind in ("uint64", "int64", "timestamp")
                 else _scalar_from_text(kind, v if isinstance(v, str) else json.dumps(v))
                 for kind, v in zip(spec, items, strict=False))


def _scalar_from_text(kind: str, text: str) -> Any:
    try:
        if kind in ("uint64", "int64"):
            return int(text)
        if kind == "timestamp":
            try:
                return int(text)
            except ValueError:
                return _dt.datetime.fromisoformat(text)
        if kind == "bytes":
            return bytes.fromhex(text)
        if kind == "uuid":
            return uuid.UUID(text)
    except ValueError:
        what = {"uint64": "a decimal integer", "int64": "a decimal integer",
                "timestamp": "integer nanoseconds or an ISO 8601 datetime",
                "bytes": "hex digits", "uuid": "a UUID"}[kind]
        raise KeyEncodingError(f"{kind} key {text!r} is not {what}",
                               hint=f"e.g. {_example((kind,))[1:-1]}") from None
    return text


def _example(spec: tuple[str, ...]) -> str:
    samples = {"uint64": "7", "int64": "-7", "timestamp": "1700000000000000000",
               "uuid": '"12345678-1234-5678-1234-567812345678"', "str": '"abc"',
               "bytes": '"00ff"'}
    return "[" + ", ".join(samples[k] for k in spec) + "]"


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
    return cast(str, kind)  # a key of _KINDS: a str (or a str subclass such as a StrEnum)


def _scalar_codec(kind: str) -> KeyCodec:
    enc, dec, width, json = _KINDS[kind]
    if width is not None:  # never empty, never too long: the kind's encoder is the whole encode
        return KeyCodec(kind, enc, dec, enc, json, width)

    what = f"{kind} key"

    def encode(key: Any) -> bytes:
        data = enc(key)
        if 0 < len(data) <= MAX_KEY_SIZE:
            return data
        raise size_error(what, data)

    encode.__doc__ = f"Encode a {kind} key; KeyEncodingError if empty or over 511 bytes."
    # A prefix may be empty (scan everything); it is not checked against the key size limit.
    return KeyCodec(kind, encode, dec, enc, json, 0 if kind == "bytes" else None)


def _tuple_codec(kinds: tuple[str, ...]) -> KeyCodec:
    n = len(kinds)
    widths = [_KINDS[kind][2] for kind in kinds]
    encoders: list[Callable[[Any], bytes]] = [
        _escaping(_KINDS[kind][0]) if width is None and i < n - 1 else _KINDS[kind][0]
        for i, (kind, width) in enumerate(zip(kinds, widths, strict=True))
    ]
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
    encode = _tuple_encoder(encoders, variable, what, _tuple_failure(kinds, pairs, what))
    encode.__doc__ = f"Encode a {kinds!r} key; KeyEncodingError if malformed or over 511 bytes."
    jsons = [_KINDS[kind][3] for kind in kinds]

    def to_json(key: tuple[Any, ...]) -> list[Any]:
        return [f(v) for f, v in zip(jsons, key, strict=True)]

    return KeyCodec(kinds, encode, _tuple_decoder(kinds), _tuple_prefix_encoder(pairs, what),
                    to_json, None if variable else fixed_size)


_Pairs = tuple[tuple[str, Callable[[Any], bytes]], ...]
"""(kind, element encoder) for each element of a tuple key."""


def _tuple_failure(
    kinds: tuple[str, ...], pairs: _Pairs, what: str
) -> Callable[[Any], KeyEncodingError]:
    """The function that explains why a key did not encode (slow path, only after a failure)."""
    n = len(kinds)

    def fail(key: Any) -> KeyEncodingError:
        if not isinstance(key, (tuple, list)):
            return KeyEncodingError(
                f"{what} must be a tuple of {n} elements, got {show(key)}",
                hint=f"pass a tuple like ({', '.join(kinds)})",
            )
        if len(key) != n:
            return KeyEncodingError(
                f"{what} must have {n} elements, got {len(key)}: {show(key)}",
                hint=f"pass a tuple like ({', '.join(kinds)})",
            )
        return _element_error(pairs, key, what)

    return fail


def _tuple_encoder(
    encoders: list[Callable[[Any], bytes]], variable: bool, what: str,
    fail: Callable[[Any], KeyEncodingError],
) -> Callable[[Any], bytes]:
    """A tuple key's encode: the element encodings joined, checked against LMDB's key size."""
    n = len(encoders)
    if n == 2:  # the common composite key: skip the join machinery
        enc0, enc1 = encoders

        def encode_pair(key: Any) -> bytes:
            if (type(key) is tuple or type(key) is list) and len(key) == 2:
                try:
                    data = enc0(key[0]) + enc1(key[1])
                except KeyEncodingError:
                    raise fail(key) from None
                if not variable or len(data) <= MAX_KEY_SIZE:
                    return data
                raise size_error(what, data)
            raise fail(key)

        return encode_pair

    def encode(key: Any) -> bytes:
        if isinstance(key, (tuple, list)) and len(key) == n:
            try:
                data = b"".join([f(v) for f, v in zip(encoders, key, strict=True)])
            except KeyEncodingError:
                raise fail(key) from None
            if not variable or 0 < len(data) <= MAX_KEY_SIZE:
                return data
            raise size_error(what, data)
        raise fail(key)

    return encode


def _tuple_prefix_encoder(pairs: _Pairs, what: str) -> Callable[[Any], bytes]:
    """A tuple key's encode_prefix: the encodings of up to n leading elements."""
    n = len(pairs)
    encoders = [enc for _, enc in pairs]

    def encode_prefix(prefix: Any) -> bytes:
        if not isinstance(prefix, (tuple, list)):
            prefix = (prefix,)
        if len(prefix) > n:
            raise KeyEncodingError(
                f"prefix {show(prefix)} has more elements than the {what}",
                hint=f"pass at most {n} leading elements",
            )
        try:
            return b"".join([f(v) for f, v in zip(encoders, prefix, strict=False)])
        except KeyEncodingError:
            raise _element_error(pairs, prefix, f"prefix of the {what}") from None

    return encode_prefix


def _escaping(enc: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """Wrap a str/bytes encoder for a non-last tuple element: escape and terminate."""

    def encode(value: Any) -> bytes:  # key_bytes.escape, inlined: the hot path
        return enc(value).replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01") + b"\x00"

    return encode


def _element_error(pairs: _Pairs, key: Any, what: str) -> KeyEncodingError:
    for i, ((kind, enc), value) in enumerate(zip(pairs, key, strict=False)):
        try:
            enc(value)
        except KeyEncodingError as exc:
            return KeyEncodingError(f"element {i} ({kind}) of {what}: {exc.message}", hint=exc.hint)
    return KeyEncodingError(f"invalid {what}: {show(key)}")  # pragma: no cover


_TupleDecoder = Callable[[bytes | memoryview], tuple[Any, ...]]


def _tuple_decoder(kinds: tuple[str, ...]) -> _TupleDecoder:
    decoders = [_KINDS[kind][1] for kind in kinds]
    widths = [_KINDS[kind][2] for kind in kinds]
    if None in widths:
        return _variable_tuple_decoder(decoders, widths)
    return _fixed_tuple_decoder(decoders, [w for w in widths if w is not None])


def _fixed_tuple_decoder(decoders: list[Callable[[Any], Any]], widths: list[int]) -> _TupleDecoder:
    """All elements fixed width: slice at precomputed offsets."""
    total = sum(widths)
    if len(decoders) == 2:
        dec0, dec1 = decoders
        cut = widths[0]

        def decode_pair(data: bytes | memoryview) -> tuple[Any, ...]:
            if len(data) != total:
                raise malformed(data, f"expected {total} bytes, got {len(data)}")
            return (dec0(data[:cut]), dec1(data[cut:]))

        return decode_pair

    slices = []
    start = 0
    for dec, width in zip(decoders, widths, strict=True):
        slices.append((dec, start, start + width))
        start += width

    def decode_fixed(data: bytes | memoryview) -> tuple[Any, ...]:
        if len(data) != total:
            raise malformed(data, f"expected {total} bytes, got {len(data)}")
        return tuple([dec(data[a:b]) for dec, a, b in slices])

    return decode_fixed


def _variable_tuple_decoder(
    decoders: list[Callable[[Any], Any]], widths: list[int | None]
) -> _TupleDecoder:
    """Some element is a str/bytes: read escaped elements up to their terminator."""
    head = list(zip(decoders[:-1], widths[:-1], strict=True))
    last_dec, last_width = decoders[-1], widths[-1]

    def decode(data: bytes | memoryview) -> tuple[Any, ...]:
        data = bytes(data)
        out = []
        pos = 0
        for dec, width in head:
            if width is None:
                body, pos = read_escaped(data, pos)
                out.append(dec(body))
            else:
                out.append(dec(data[pos : pos + width]))
                pos += width
        if last_width is not None and len(data) - pos != last_width:
            raise malformed(data, f"last element should be {last_width} bytes")
        out.append(last_dec(data[pos:]))
        return tuple(out)

    return decode
