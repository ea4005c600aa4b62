"""lmshard.keys: round trips, bytewise order == natural order, prefixes, index values, errors."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshard.errors import KeyEncodingError, SchemaError
from lmshard.keys import (
    KEY_KINDS,
    KeyCodec,
    decode_index_value,
    encode_index_prefix,
    encode_index_value,
    key_codec,
)

UTC = dt.UTC
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
UUID0 = uuid.UUID(int=0)

# --- strategies ----------------------------------------------------------------------------------
# Small alphabets make the hard cases common: embedded NULs, 0xFF, one value a prefix of another.

TRICKY_CHARS = ["\x00", "\x01", "a", "b", "\x7f", "\xff", "é", "中", "\U0001f600", "\U0010ffff"]
TRICKY_BYTES = [0x00, 0x01, 0x61, 0x7F, 0xFE, 0xFF]


def texts(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(st.sampled_from(TRICKY_CHARS), min_size=min_size, max_size=6),
        st.text(min_size=min_size, max_size=20),
    )


def binaries(min_size: int = 0) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.lists(st.sampled_from(TRICKY_BYTES), min_size=min_size, max_size=6).map(bytes),
        st.binary(min_size=min_size, max_size=30),
    )


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, low + 1, -1, 0, 1, 255, 256, high - 1, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


uuids = st.one_of(
    st.uuids(), st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)])
)


def values(kind: str, nonempty: bool) -> st.SearchStrategy:
    """Keys of one kind in their natural (decoded) form; timestamps are int nanoseconds."""
    size = 1 if nonempty else 0
    return {
        "uint64": ints(0, UINT64_MAX),
        "int64": ints(INT64_MIN, INT64_MAX),
        "timestamp": ints(INT64_MIN, INT64_MAX),  # negative = before 1970
        "uuid": uuids,
        "str": texts(size),
        "bytes": binaries(size),
    }[kind]


def tuple_keys(spec: tuple[str, ...]) -> st.SearchStrategy[tuple]:
    nonempty = len(spec) == 1  # only a lone str/bytes element could make the whole key empty
    return st.tuples(*(values(kind, nonempty) for kind in spec))


specs = st.lists(st.sampled_from(KEY_KINDS), min_size=1, max_size=4).map(tuple)

NAMED_SPECS = [
    ("uuid", "timestamp"),
    ("str", "uint64"),
    ("bytes", "str"),
    ("int64", "int64"),
    ("bytes", "bytes"),
    ("bytes", "uint64"),
    ("str", "str", "bytes"),
    ("timestamp", "str", "int64"),
]

offsets = st.timedeltas(min_value=-dt.timedelta(hours=23), max_value=dt.timedelta(hours=23))
timezones = st.one_of(st.just(UTC), st.builds(dt.timezone, offsets))
aware_datetimes = st.datetimes(  # a day inside datetime's range, so any offset converts to UTC
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=timezones
)
ns_datetimes = st.datetimes(
    min_value=dt.datetime(1678, 1, 1),
    max_value=dt.datetime(2261, 12, 31),
    timezones=st.one_of(st.none(), timezones),
)


def expected_ns(value: dt.datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    delta = aware - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def near(value, data: st.DataObject, always: bool = False):
    """``value`` itself, or for str/bytes a near miss: a truncation or a NUL/0xFF extension."""
    if not isinstance(value, (str, bytes)) or not (always or data.draw(st.booleans())):
        return value
    cut = data.draw(st.integers(0, len(value)))
    tail = data.draw(st.sampled_from(["", "\x00", "\x00\x00", "\x00\xff", "\x01", "\xff"]))
    if isinstance(value, bytes):
        return value[:cut] + tail.encode("latin-1")
    return value[:cut] + tail


def pick_prefix(value: tuple, other: tuple, k: int, data: st.DataObject) -> tuple:
    """A k-element prefix mixing elements of ``value``, near misses of them, and ``other``'s."""
    choices = data.draw(st.lists(st.sampled_from("vno"), min_size=k, max_size=k))
    table = {"v": lambda i: value[i], "n": lambda i: near(value[i], data), "o": lambda i: other[i]}
    return tuple(table[c](i) for i, c in enumerate(choices))


def assert_order_preserved(keys: list, encode) -> None:
    encoded = {i: encode(k) for i, k in enumerate(keys)}
    assert [keys[i] for i in sorted(encoded, key=encoded.__getitem__)] == sorted(keys)
    for i in range(len(keys) - 1):
        a, b, ea, eb = keys[i], keys[i + 1], encoded[i], encoded[i + 1]
        assert (a < b) == (ea < eb), (a, b, ea, eb)
        assert (a == b) == (ea == eb), (a, b, ea, eb)


# --- declared key kinds --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEY_KINDS)
@settings(max_examples=40)
@given(data=st.data())
def test_scalar_round_trip(kind: str, data: st.DataObject) -> None:
    codec = key_codec(kind)
    key = data.draw(values(kind, nonempty=True))
    encoded = codec.encode(key)
    assert type(encoded) is bytes and 1 <= len(encoded) <= 511
    for form in (encoded, memoryview(encoded), bytearray(encoded)):
        decoded = codec.decode(form)
        assert decoded == key and type(decoded) is type(key)


@pytest.mark.parametrize("kind", KEY_KINDS)
@settings(max_examples=30)
@given(data=st.data())
def test_scalar_order(kind: str, data: st.DataObject) -> None:
    keys = data.draw(st.lists(values(kind, nonempty=True), min_size=2, max_size=12))
    assert_order_preserved(keys, key_codec(kind).encode)


def test_fixed_width_encodings() -> None:
    assert key_codec("uint64").encode(1) == b"\x00" * 7 + b"\x01"
    assert key_codec("int64").encode(-1) == b"\x7f" + b"\xff" * 7
    assert key_codec("int64").encode(0) == b"\x80" + b"\x00" * 7
    assert key_codec("timestamp").encode(INT64_MIN) == b"\x00" * 8
    u = uuid.uuid4()
    assert key_codec("uuid").encode(u) == u.bytes
    assert key_codec("str").encode("é") == "é".encode()


def test_int64_and_timestamp_sort_negatives_first() -> None:
    for kind in ("int64", "timestamp"):
        enc = key_codec(kind).encode
        ordered = [INT64_MIN, -(2**32), -1, 0, 1, 2**32, INT64_MAX]
        assert sorted(ordered, key=enc) == ordered


@settings(max_examples=60)
@given(stamps=st.lists(ns_datetimes, min_size=2, max_size=8))
def test_timestamp_accepts_datetimes(stamps: list[dt.datetime]) -> None:
    codec = key_codec("timestamp")
    for stamp in stamps:
        assert codec.encode(stamp) == codec.encode(expected_ns(stamp))
        assert codec.decode(codec.encode(stamp)) == expected_ns(stamp)
    instants = [s if s.tzinfo else s.replace(tzinfo=UTC) for s in stamps]
    assert_order_preserved(instants, codec.encode)


def test_timestamp_naive_datetime_is_utc_and_pre_1970_works() -> None:
    codec = key_codec("timestamp")
    naive = dt.datetime(1969, 12, 31, 23, 59, 59, 999999)
    assert codec.decode(codec.encode(naive)) == -1000
    assert codec.encode(naive) == codec.encode(naive.replace(tzinfo=UTC))
    paris = dt.timezone(dt.timedelta(hours=1))
    assert codec.encode(dt.datetime(1970, 1, 1, 1, tzinfo=paris)) == codec.encode(0)


def test_uuid_accepts_strings_and_decodes_real_uuids() -> None:
    codec = key_codec("uuid")
    u = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    assert codec.encode(str(u)) == codec.encode(u) == u.bytes
    back = codec.decode(u.bytes)
    assert type(back) is uuid.UUID
    assert back == u and hash(back) == hash(u) and str(back) == str(u) and back.version == 5
    assert back.is_safe is uuid.SafeUUID.unknown
    assert uuid.UUID(bytes=bytes(16)) == codec.decode(memoryview(bytes(16)))


def test_int_like_keys_are_accepted() -> None:
    class Color(enum.IntEnum):
        RED = 7

    assert key_codec("uint64").encode(Color.RED) == key_codec("uint64").encode(7)
    assert key_codec("int64").encode(Color.RED) == key_codec("int64").encode(7)
    assert key_codec("bytes").encode(bytearray(b"ab")) == b"ab"
    assert key_codec("bytes").encode(memoryview(b"ab")) == b"ab"


@pytest.mark.parametrize("spec", NAMED_SPECS)
@settings(max_examples=20)
@given(data=st.data())
def test_named_tuple_round_trip_and_order(spec: tuple[str, ...], data: st.DataObject) -> None:
    codec = key_codec(spec)
    keys = data.draw(st.lists(tuple_keys(spec), min_size=2, max_size=12))
    for key in keys:
        assert codec.decode(codec.encode(key)) == key
        assert codec.decode(memoryview(codec.encode(list(key)))) == key
    assert_order_preserved(keys, codec.encode)


@settings(max_examples=60)
@given(data=st.data())
def test_random_tuple_round_trip_and_order(data: st.DataObject) -> None:
    spec = data.draw(specs)
    codec = key_codec(spec)
    keys = data.draw(st.lists(tuple_keys(spec), min_size=2, max_size=8))
    for key in keys:
        decoded = codec.decode(codec.encode(key))
        assert decoded == key and type(decoded) is tuple
        assert [type(v) for v in decoded] == [type(v) for v in key]
    assert_order_preserved(keys, codec.encode)


@pytest.mark.parametrize(
    ("spec", "ordered"),
    [
        # a lone 0x00 terminator would make the middle two collide, and misorder the last pair
        (("bytes", "bytes"), [(b"", b""), (b"", b"\xff\x00"), (b"\x00", b""), (b"\x00", b"\xff")]),
        (("bytes", "uint64"), [(b"", UINT64_MAX), (b"\x00", 0), (b"\x00\xff", 0), (b"\x01", 0)]),
        (("str", "uint64"), [("a", UINT64_MAX), ("a\x00", 0), ("a\x00\x00", 0), ("ab", 0)]),
        (("str", "str"), [("", "\U0010ffff"), ("a", ""), ("a", "\x00"), ("a\x00", ""), ("ab", "")]),
        (("int64", "int64"), [(-1, INT64_MAX), (0, INT64_MIN), (0, -1), (0, 0), (1, -5)]),
        (("uuid", "timestamp"), [(UUID0, -1), (UUID0, 0), (uuid.UUID(int=1), INT64_MIN)]),
    ],
)
def test_tuple_order_edge_cases(spec: tuple[str, ...], ordered: list[tuple]) -> None:
    codec = key_codec(spec)
    encoded = [codec.encode(k) for k in ordered]
    assert encoded == sorted(encoded) and len(set(encoded)) == len(encoded)
    assert [codec.decode(e) for e in encoded] == ordered


def test_tuple_layout() -> None:
    # non-last str/bytes: 00 -> 01 01, 01 -> 01 02, then terminator 00; last element raw
    codec = key_codec(("str", "bytes"))
    assert codec.encode(("a\x00b", b"\x00")) == b"a\x01\x01b\x00\x00"
    assert codec.encode(("\x01", b"\x01")) == b"\x01\x02\x00\x01"
    assert codec.decode(b"\x01\x02\x01\x01\x00\xff") == ("\x01\x00", b"\xff")
    assert key_codec(("uint64", "str")).encode((1, "x")) == b"\x00" * 7 + b"\x01x"
    assert key_codec(("str",)).decode(b"abc") == ("abc",)
    assert key_codec(["uint64", "int64"]).spec == ("uint64", "int64")


def _element_prefix_match(kind: str, key_value, prefix_value) -> bool:
    """The last element of a full-length prefix acts as its kind's scalar prefix."""
    if kind in ("str", "bytes"):
        return key_value.startswith(prefix_value)
    return key_value == prefix_value


@settings(max_examples=60)
@given(data=st.data())
def test_tuple_prefix_property(data: st.DataObject) -> None:
    spec = data.draw(st.one_of(st.sampled_from(NAMED_SPECS), specs))
    codec = key_codec(spec)
    n = len(spec)
    key, other = data.draw(tuple_keys(spec)), data.draw(tuple_keys(spec))
    k = data.draw(st.integers(1, n))
    prefix = pick_prefix(key, other, k, data)
    starts = codec.encode(key).startswith(codec.encode_prefix(prefix))
    if k < n:
        assert starts == (key[:k] == prefix)
    else:
        expected = key[: n - 1] == prefix[: n - 1] and _element_prefix_match(
            spec[-1], key[-1], prefix[-1]
        )
        assert starts == expected


@pytest.mark.parametrize("kind", ["str", "bytes"])
@settings(max_examples=50)
@given(data=st.data())
def test_prefix_near_misses(kind: str, data: st.DataObject) -> None:
    """A prefix element that is a truncation or extension of the key's never matches it."""
    value = data.draw(values(kind, nonempty=False))
    candidate = near(value, data, always=True)
    for spec in [(kind, "uint64"), (kind, kind)]:
        codec = key_codec(spec)
        key = (value, data.draw(values(spec[1], nonempty=False)))
        starts = codec.encode(key).startswith(codec.encode_prefix((candidate,)))
        assert starts == (candidate == value), (key, candidate)
    for index_value in [value, (value, 1), (value, value)]:
        starts = encode_index_value(index_value).startswith(encode_index_prefix((candidate,)))
        assert starts == (candidate == value), (index_value, candidate)


def test_tuple_prefix_edge_cases() -> None:
    codec = key_codec(("str", "uint64"))
    assert not codec.encode(("ab", 1)).startswith(codec.encode_prefix(("a",)))
    assert not codec.encode(("a\x00", 1)).startswith(codec.encode_prefix(("a",)))
    assert codec.encode(("a", 1)).startswith(codec.encode_prefix("a"))  # scalar = 1-tuple
    assert codec.encode_prefix(()) == b""
    assert codec.encode_prefix(("a", 1)) == codec.encode(("a", 1))
    both = key_codec(("uuid", "str"))
    u = uuid.uuid4()
    assert both.encode((u, "abc")).startswith(both.encode_prefix((u, "ab")))
    assert both.encode_prefix((u, "")) == both.encode_prefix((u,)) == u.bytes
    with pytest.raises(KeyEncodingError, match="at most 2"):
        codec.encode_prefix(("a", 1, 2))
    with pytest.raises(KeyEncodingError, match="element 1"):
        codec.encode_prefix(("a", -1))


@settings(max_examples=60)
@given(key=texts(1), prefix=texts())
def test_str_prefix_is_a_string_prefix(key: str, prefix: str) -> None:
    codec = key_codec("str")
    assert codec.encode(key).startswith(codec.encode_prefix(prefix)) == key.startswith(prefix)


def test_scalar_prefixes() -> None:
    assert key_codec("bytes").encode_prefix(bytearray(b"\x00a")) == b"\x00a"
    assert key_codec("str").encode_prefix("") == b""
    for kind, key in [("uint64", 5), ("int64", -5), ("timestamp", 0), ("uuid", uuid.uuid4())]:
        codec = key_codec(kind)
        assert codec.encode_prefix(key) == codec.encode(key)


def test_to_json() -> None:
    u = uuid.uuid4()
    codec = key_codec(("uuid", "bytes", "str", "int64", "timestamp"))
    key = (u, b"\x00\xff", "é", -3, dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert codec.to_json(key) == [str(u), "00ff", "é", -3, 10**9]
    json.dumps(codec.to_json(key))
    assert key_codec("uuid").to_json(str(u)) == str(u)
    assert key_codec("bytes").to_json(b"\x01") == "01"
    assert key_codec("uint64").to_json(7) == 7
    assert isinstance(key_codec("uint64"), KeyCodec) and "uint64" in repr(key_codec("uint64"))


def test_key_codec_is_slotted() -> None:
    codec = key_codec("uint64")
    with pytest.raises(AttributeError):
        codec.extra = 1  # type: ignore[attr-defined]


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bad"),
    [
        ("uint64", -1),
        ("uint64", 2**64),
        ("uint64", True),
        ("uint64", False),
        ("uint64", 1.0),
        ("uint64", "1"),
        ("uint64", None),
        ("int64", 2**63),
        ("int64", -(2**63) - 1),
        ("int64", True),
        ("int64", 1.5),
        ("timestamp", 2**63),
        ("timestamp", True),
        ("timestamp", 1.5),
        ("timestamp", "2020-01-01"),
        ("timestamp", dt.date(2020, 1, 1)),
        ("timestamp", dt.datetime(2300, 1, 1)),
        ("timestamp", dt.datetime(1600, 1, 1, tzinfo=UTC)),
        ("uuid", "not-a-uuid"),
        ("uuid", 123),
        ("uuid", b"x" * 16),
        ("str", b"abc"),
        ("str", 5),
        ("str", "\ud800"),
        ("bytes", "abc"),
        ("bytes", 5),
        ("bytes", [1, 2]),
    ],
)
def test_bad_scalar_keys_are_rejected(kind: str, bad: object) -> None:
    with pytest.raises(KeyEncodingError) as info:
        key_codec(kind).encode(bad)
    assert kind in str(info.value) and info.value.hint


@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_empty_keys_are_rejected(kind: str) -> None:
    empty = "" if kind == "str" else b""
    with pytest.raises(KeyEncodingError, match="empty.*zero-length"):
        key_codec(kind).encode(empty)
    with pytest.raises(KeyEncodingError, match="empty"):
        key_codec((kind,)).encode((empty,))


@pytest.mark.parametrize(
    ("spec", "ok", "too_long"),
    [
        ("str", "x" * 511, "x" * 512),
        ("str", "é" * 255 + "x", "é" * 256),  # the limit is on UTF-8 bytes
        ("bytes", b"x" * 511, b"x" * 512),
        (("str", "str"), ("x" * 255, "y" * 255), ("x" * 255, "y" * 256)),
        (("uint64", "bytes"), (1, b"x" * 503), (1, b"x" * 504)),
    ],
)
def test_long_keys_are_rejected(spec, ok, too_long) -> None:
    codec = key_codec(spec)
    assert len(codec.encode(ok)) == 511
    with pytest.raises(KeyEncodingError, match="511") as info:
        codec.encode(too_long)
    message = str(info.value)
    assert "LMDB" in message and "hash" in message and "surrogate" in message


def test_bad_tuple_keys_are_rejected() -> None:
    codec = key_codec(("uuid", "timestamp"))
    u = uuid.uuid4()
    with pytest.raises(KeyEncodingError, match="tuple of 2"):
        codec.encode(u)
    with pytest.raises(KeyEncodingError, match="2 elements"):
        codec.encode((u,))
    with pytest.raises(KeyEncodingError, match="element 1 \\(timestamp\\)"):
        codec.encode((u, 1.5))
    with pytest.raises(KeyEncodingError, match="element 0 \\(uuid\\)"):
        codec.encode(("nope", 1))
    triple = key_codec(("str", "uint64", "bytes"))
    with pytest.raises(KeyEncodingError, match="element 1 \\(uint64\\)"):
        triple.encode(("a", True, b""))
    with pytest.raises(KeyEncodingError, match="3 elements"):
        triple.encode(("a", 1))
    with pytest.raises(KeyEncodingError, match="malformed"):
        codec.decode(b"\x00" * 10)


@pytest.mark.parametrize("spec", ["float", ("uuid", "float"), (), [], 5, None, ("uuid",) * 32])
def test_bad_specs_are_schema_errors(spec) -> None:
    with pytest.raises(SchemaError) as info:
        key_codec(spec)
    if spec != ("uuid",) * 32:
        assert all(kind in str(info.value) for kind in KEY_KINDS)


# --- dynamic index values ------------------------------------------------------------------------

index_types: dict[str, st.SearchStrategy] = {
    "none": st.none(),
    "bool": st.booleans(),
    "int": ints(INT64_MIN, INT64_MAX),
    "float": st.floats(allow_nan=False),
    "str": texts(),
    "bytes": binaries(),
    "uuid": uuids,
    "datetime": aware_datetimes,
}
TAG_ORDER = ["none", "bool", "int", "float", "str", "bytes", "uuid", "datetime"]


def normalized(value):
    """What decode_index_value gives back for a value."""
    if isinstance(value, float) and value == 0:
        return 0.0
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    return value


def same(a, b) -> bool:
    return (
        type(a) is type(b)
        and a == b
        and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))
    )


@pytest.mark.parametrize("name", TAG_ORDER)
@settings(max_examples=50)
@given(data=st.data())
def test_index_value_round_trip_and_order(name: str, data: st.DataObject) -> None:
    vals = data.draw(st.lists(index_types[name], min_size=2, max_size=10))
    for v in vals:
        encoded = encode_index_value(v)
        assert same(decode_index_value(encoded), normalized(v))
        assert same(decode_index_value(memoryview(encoded)), normalized(v))
        assert encode_index_value((v,)) == encode_index_value([v]) == encoded
    if name != "none":
        assert_order_preserved(vals, encode_index_value)


@settings(max_examples=40)
@given(stamp=st.datetimes())
def test_index_naive_datetime_is_utc(stamp: dt.datetime) -> None:
    assert encode_index_value(stamp) == encode_index_value(stamp.replace(tzinfo=UTC))
    back = decode_index_value(encode_index_value(stamp))
    assert back == stamp.replace(tzinfo=UTC) and back.tzinfo is UTC


@settings(max_examples=100)
@given(data=st.data())
def test_index_order_across_types_is_by_tag(data: st.DataObject) -> None:
    a_type, b_type = data.draw(st.sampled_from(TAG_ORDER)), data.draw(st.sampled_from(TAG_ORDER))
    a, b = data.draw(index_types[a_type]), data.draw(index_types[b_type])
    if a_type != b_type:
        ea, eb = encode_index_value(a), encode_index_value(b)
        assert (ea < eb) == (TAG_ORDER.index(a_type) < TAG_ORDER.index(b_type))


def test_index_tag_order_examples() -> None:
    ordered = [
        None, False, True, INT64_MIN, -1, 0, INT64_MAX, -math.inf, -1.5, -0.0, 5e-324, 1.0,
        math.inf, math.nan, "", "\x00", "a", "\U0010ffff", b"", b"\x00", b"\xff",
        uuid.UUID(int=0), uuid.UUID(int=2**128 - 1),
        dt.datetime.min.replace(tzinfo=UTC), EPOCH, dt.datetime.max.replace(tzinfo=UTC),
    ]  # fmt: skip
    encoded = [encode_index_value(v) for v in ordered]
    assert encoded == sorted(encoded) and len(set(encoded)) == len(ordered)


def test_index_float_special_values() -> None:
    assert encode_index_value(-0.0) == encode_index_value(0.0)
    assert math.copysign(1, decode_index_value(encode_index_value(-0.0))) == 1
    other_nan = struct.unpack(">d", b"\xff\xf8\x00\x00\x00\x00\x00\x01")[0]
    assert encode_index_value(math.nan) == encode_index_value(other_nan)
    assert math.isnan(decode_index_value(encode_index_value(other_nan)))
    assert encode_index_value(math.inf) < encode_index_value(math.nan)


def test_index_distinguishes_bool_int_float() -> None:
    encoded = {encode_index_value(v) for v in (True, 1, 1.0)}
    assert len(encoded) == 3
    assert type(decode_index_value(encode_index_value(True))) is bool
    assert type(decode_index_value(encode_index_value(1))) is int


def test_index_subclasses_encode_like_their_base() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    assert encode_index_value(Level.HIGH) == encode_index_value(3)
    assert encode_index_value(Name("x")) == encode_index_value("x")
    assert encode_index_value(bytearray(b"x")) == encode_index_value(b"x")


# Composite index values: each position has one type (a "shape"), as an index function gives.
shapes = st.lists(st.sampled_from(TAG_ORDER), min_size=1, max_size=4)


def shaped_tuples(shape: list[str], min_size: int = 1) -> st.SearchStrategy[tuple]:
    """Tuples following ``shape`` truncated to a random length (so some are prefixes)."""
    full = st.tuples(*(index_types[name] for name in shape))
    return st.builds(lambda t, k: t[:k], full, st.integers(min_size, len(shape)))


@settings(max_examples=100)
@given(data=st.data())
def test_index_tuples_round_trip_and_order(data: st.DataObject) -> None:
    shape = data.draw(shapes)
    vals = data.draw(st.lists(shaped_tuples(shape), min_size=2, max_size=8))
    for v in vals:
        back = decode_index_value(encode_index_value(v))
        expected = tuple(normalized(x) for x in v)
        if len(v) == 1:
            assert same(back, expected[0])
        else:
            assert type(back) is tuple and len(back) == len(v)
            assert all(same(x, y) for x, y in zip(back, expected, strict=True))

    # None has no order in Python: compare with None replaced by a value sorting first
    def natural(t: tuple) -> tuple:
        return tuple((0,) if x is None else (1, x) for x in t)

    keyed = [natural(v) for v in vals]
    encoded = [encode_index_value(v) for v in vals]
    for i in range(len(vals) - 1):
        assert (keyed[i] < keyed[i + 1]) == (encoded[i] < encoded[i + 1]), (vals[i], vals[i + 1])
        assert (keyed[i] == keyed[i + 1]) == (encoded[i] == encoded[i + 1])


@settings(max_examples=100)
@given(data=st.data())
def test_index_prefix_property(data: st.DataObject) -> None:
    shape = data.draw(shapes)
    value = data.draw(shaped_tuples(shape, min_size=len(shape)))
    other = data.draw(shaped_tuples(shape, min_size=len(shape)))
    k = data.draw(st.integers(0, len(shape)))
    prefix = pick_prefix(value, other, k, data)
    starts = encode_index_value(value).startswith(encode_index_prefix(prefix))
    leading = zip(value[:k], prefix, strict=True)
    assert starts == all(same(normalized(a), normalized(b)) for a, b in leading)


def test_index_prefix_edge_cases() -> None:
    assert encode_index_prefix(()) == b""
    assert encode_index_prefix(("a",)) == encode_index_value("a") == encode_index_value(["a"])
    assert encode_index_prefix("a") == encode_index_value("a")[:-1]  # str alone: string prefix
    assert encode_index_prefix(5) == encode_index_prefix((5,)) == encode_index_value(5)
    full = encode_index_value(("a", 1))
    assert full.startswith(encode_index_prefix(("a",)))
    assert not encode_index_value(("ab", 1)).startswith(encode_index_prefix(("a",)))
    assert not encode_index_value(("a\x00", 1)).startswith(encode_index_prefix(("a",)))
    assert not encode_index_value((1.0, 1)).startswith(encode_index_prefix((1,)))


@settings(max_examples=80)
@given(data=st.data())
def test_index_string_prefix(data: st.DataObject) -> None:
    """A lone str/bytes prefix matches str/bytes values (and first elements) starting with it."""
    strategy = data.draw(st.sampled_from([texts(), binaries()]))
    value = data.draw(strategy)
    if data.draw(st.booleans()):
        prefix = near(value, data, always=True)
    else:
        prefix = data.draw(strategy)
    encoded_prefix = encode_index_prefix(prefix)
    for stored in (value, (value, 1), (value, value)):
        assert encode_index_value(stored).startswith(encoded_prefix) == value.startswith(prefix)
    other_type = b"x" if isinstance(value, str) else "x"
    assert not encode_index_value(other_type).startswith(encoded_prefix)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (2**63, "int64"),
        (-(2**63) - 1, "int64"),
        (((1, 2),), "nested"),
        ((1, [2]), "nested"),
        ((), "empty"),
        ([], "empty"),
        ({1}, "unsupported"),
        (dt.date(2020, 1, 1), "unsupported"),
        (decimal.Decimal(1), "unsupported"),
        ("\ud800", "UTF-8"),
        ("x" * 600, "511"),
        (("x" * 300, b"y" * 300), "511"),
        (dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5))), "range"),
    ],
)
def test_bad_index_values_are_rejected(bad: object, match: str) -> None:
    with pytest.raises(KeyEncodingError, match=match):
        encode_index_value(bad)


@pytest.mark.parametrize("data", [b"", b"\x99", b"\x30\x00", b"\x50abc", b"\x70" + bytes(15)])
def test_malformed_index_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(KeyEncodingError, match="malformed"):
        decode_index_value(data)


# --- any_width: the shard owner's shortcut for "these bytes are a canonical key" ---------------

ANY_WIDTH_SPECS = ["uint64", "int64", "timestamp", "uuid", "bytes", ("uint64", "uuid"),
                   ("int64", "timestamp", "uint64")]


@pytest.mark.parametrize("spec", ANY_WIDTH_SPECS, ids=str)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_width_promise_holds_for_every_byte_string(spec: object, data: st.DataObject) -> None:
    codec = key_codec(spec)  # type: ignore[arg-type]
    width = codec.any_width
    assert width is not None
    size = data.draw(st.integers(1, 511)) if width == 0 else width
    kb = data.draw(st.binary(min_size=size, max_size=size))
    assert codec.encode(codec.decode(kb)) == kb


@pytest.mark.parametrize("spec", ["str", ("str", "uint64"), ("bytes", "uint64"), ("bytes", "str")],
                         ids=str)
def test_any_width_is_unset_where_some_bytes_are_not_keys(spec: object) -> None:
    codec = key_codec(spec)  # type: ignore[arg-type]
    assert codec.any_width is None
    bad = {"str": b"\xff\xfe", ("str", "uint64"): b"ab" + b"\x00" * 8,
           ("bytes", "uint64"): b"a\x01\x09\x00" + b"\x00" * 8,
           ("bytes", "str"): b"a\x01\x09\x00x"}[spec]
    try:
        canonical = codec.encode(codec.decode(bad)) == bad
    except Exception:
        canonical = False
    assert not canonical
