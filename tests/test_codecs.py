"""Tests for lmshard.codecs: built-in codecs, numpy arrays, FlatBuffers tables, the registry."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid

import flatbuffers
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshard.codecs import (
    Codec,
    codec_names,
    flatbuffers_codec,
    get_codec,
    register_codec,
    registry,
)
from lmshard.errors import CodecError, SchemaError
from tests.fbs.User import User, UserT

FAST = settings(max_examples=150, deadline=None)


def roundtrip(codec: Codec, value):
    data = codec.dumps(value)
    assert type(data) is bytes
    assert codec.loads(data) == value
    assert codec.loads(memoryview(data)) == value  # LMDB with buffers=True hands out memoryviews
    json.dumps(codec.to_json(value))  # the debug view is always JSON-serializable
    return data


# --------------------------------------------------------------------------------------------
# cbor, msgpack, json, bytes

finite_floats = st.floats(allow_nan=False)
text = st.text(max_size=20)


def trees(scalars, keys):
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5)
        ),
        max_leaves=20,
    )


cbor_values = trees(
    st.none() | st.booleans() | st.integers() | finite_floats | text | st.binary(max_size=20),
    text | st.integers(),
)
msgpack_values = trees(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | finite_floats
    | text
    | st.binary(max_size=20),
    text | st.integers(-(2**63), 2**64 - 1),
)
json_values = trees(st.none() | st.booleans() | st.integers() | finite_floats | text, text)


@FAST
@given(cbor_values)
def test_cbor_roundtrip(value):
    roundtrip(get_codec("cbor"), value)


@FAST
@given(msgpack_values)
def test_msgpack_roundtrip(value):
    roundtrip(get_codec("msgpack"), value)


@FAST
@given(json_values)
def test_json_roundtrip(value):
    roundtrip(get_codec("json"), value)


def test_json_is_compact_utf8():
    data = get_codec("json").dumps({"name": "Zoë", "tags": [1, 2]})
    assert data == '{"name":"Zoë","tags":[1,2]}'.encode()


def test_msgpack_int_keys_and_bin_type():
    codec = get_codec("msgpack")
    assert codec.loads(codec.dumps({1: "a", "b": b"\x00\xff"})) == {1: "a", "b": b"\x00\xff"}
    assert codec.dumps(b"x")[0] == 0xC4  # bin 8, not raw str (use_bin_type=True)


def test_msgpack_failed_encode_leaves_no_residue():
    codec = get_codec("msgpack")
    for bad in ({"a": [1, 2, {3}]}, [1, 2, 2**65]):
        with pytest.raises(CodecError):
            codec.dumps(bad)
        assert codec.dumps({"x": 1}) == b"\x81\xa1x\x01"  # not prefixed by the failed value


def test_msgpack_threads_do_not_share_a_packer():
    codec = get_codec("msgpack")
    errors: list[object] = []

    def work(n: int) -> None:
        value = {"thread": n, "payload": list(range(n, n + 50))}
        for _ in range(300):
            if codec.loads(codec.dumps(value)) != value:
                errors.append(n)
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_cbor_types_beyond_json():
    codec = get_codec("cbor")
    value = {
        "when": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
        "ids": {1, 2, 3},
        "big": 2**100,
    }
    assert codec.loads(codec.dumps(value)) == value
    shown = codec.to_json({**value, "raw": b"\x00\x01"})
    assert shown == {
        "when": "2024-05-01T12:00:00+00:00",
        "ids": [1, 2, 3],
        "big": 2**100,
        "raw": {"$base64": "AAE="},
    }
    json.dumps(shown)


@FAST
@given(st.binary(max_size=200))
def test_bytes_roundtrip(value):
    codec = get_codec("bytes")
    assert codec.dumps(value) is value  # bytes are stored as is, no copy
    for wrapped in (bytearray(value), memoryview(value)):
        data = codec.dumps(wrapped)
        assert type(data) is bytes and data == value
    out = codec.loads(memoryview(value))
    assert type(out) is bytes and out == value


@pytest.mark.parametrize("value", ["text", 3, [1, 2], None])
def test_bytes_rejects_non_bytes(value):
    with pytest.raises(
        CodecError, match=f"bytes cannot encode a value of type {type(value).__name__}"
    ):
        get_codec("bytes").dumps(value)


@pytest.mark.parametrize(
    ("name", "value", "bad_type"),
    [
        ("cbor", object(), "object"),
        ("cbor", {"nested": [object()]}, "object"),
        ("cbor", dt.datetime(2024, 1, 1), "datetime"),  # naive datetime
        ("msgpack", {1, 2}, "set"),
        ("msgpack", {"a": {1, 2}}, "set"),
        ("msgpack", 2**64, "int"),
        ("msgpack", 1j, "complex"),
        ("json", {1, 2}, "set"),
        ("json", b"bytes", "bytes"),
        ("json", {(1, 2): "tuple key"}, "tuple"),
    ],
)
def test_encode_errors_name_codec_and_type(name, value, bad_type):
    with pytest.raises(CodecError) as info:
        get_codec(name).dumps(value)
    assert info.value.message.startswith(f"{name} cannot encode a value of type {bad_type}")
    assert info.value.hint
    assert info.value.__cause__ is not None  # the library's own error is kept


@pytest.mark.parametrize("name", ["cbor", "msgpack", "json"])
def test_encode_cycle_is_codec_error(name):
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(CodecError, match=f"^{name} cannot encode a value of type list"):
        get_codec(name).dumps(cyclic)


@pytest.mark.parametrize(
    ("name", "garbage"),
    [
        ("cbor", b""),
        ("cbor", b"\xff"),  # break code outside a container
        ("cbor", b"\x9f\x01"),  # unterminated array
        ("cbor", b"\x1c"),  # reserved additional info
        ("msgpack", b""),
        ("msgpack", b"\xc1"),  # the never-used byte
        ("msgpack", b"\x01\x02"),  # extra data
        ("msgpack", b"\xa1\x80"),  # str that is not UTF-8
        ("json", b""),
        ("json", b"{"),
        ("json", b"\xff\xfe"),  # not UTF-8
        ("json", b"[1] x"),
        ("numpy", b""),
        ("numpy", b"garbage!"),
        ("numpy", b"\xa1\x01\x03\x00zzz" + bytes(16)),  # unknown dtype
        ("numpy", b"\xa1\x01\x03\x00<i4" + bytes(16)),  # truncated shape / data
    ],
)
def test_decode_garbage_is_codec_error(name, garbage):
    with pytest.raises(CodecError, match=f"^{name} cannot decode"):
        get_codec(name).loads(garbage)
    with pytest.raises(CodecError, match=f"^{name} cannot decode"):
        get_codec(name).loads(memoryview(garbage))


def test_decode_wrong_codec_is_codec_error():
    stored = get_codec("cbor").dumps({"a": 1})
    with pytest.raises(CodecError, match="not written with the 'numpy' codec"):
        get_codec("numpy").loads(stored)


# --------------------------------------------------------------------------------------------
# numpy

NUMPY = get_codec("numpy")
rng = np.random.default_rng(1234)


def np_roundtrip(arr: np.ndarray) -> np.ndarray:
    out = NUMPY.loads(NUMPY.dumps(arr))
    assert type(out) is np.ndarray
    assert out.dtype == arr.dtype and out.dtype.str == arr.dtype.str  # byte order included
    assert out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # tobytes() is C order for both
    assert out.flags.c_contiguous
    return out


@pytest.mark.parametrize(
    "dtype",
    [
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "bool",
        ">i4",
        ">f8",
        "<u2",
        "datetime64[ms]",
    ],
)
def test_numpy_dtypes(dtype):
    arr = (rng.random((4, 5)) * 100).astype(dtype)
    np_roundtrip(arr)


def test_numpy_structured_dtype():
    dtype = np.dtype([("id", "<u8"), ("pos", ">f4", (3,)), ("flags", [("on", "?"), ("n", "i1")])])
    arr = np.zeros(4, dtype)
    arr["id"] = [1, 2, 3, 2**63]
    arr["pos"] = rng.random((4, 3))
    arr["flags"]["on"] = [True, False, True, False]
    out = np_roundtrip(arr)
    assert out["id"][3] == 2**63 and out["pos"].dtype == np.dtype(">f4")


def test_numpy_structured_dtype_with_padding():
    dtype = np.dtype(
        {"names": ["a", "b"], "formats": ["u1", "<i8"], "offsets": [0, 8], "itemsize": 24}
    )
    arr = np.array([(1, -5), (2, 7)], dtype)
    out = np_roundtrip(arr)
    assert out.dtype.itemsize == 24 and out["b"].tolist() == [-5, 7]


@pytest.mark.parametrize(
    "arr",
    [
        np.array(3.5),  # 0-d
        np.array(7, dtype=">i2"),
        np.zeros((0, 3), dtype="int32"),  # empty
        np.zeros((2, 0, 4)),
        np.arange(24, dtype="int16").reshape(2, 3, 4),  # 3-d
        np.arange(2 * 3 * 4 * 5 * 6, dtype="uint8").reshape(2, 3, 4, 5, 6),
    ],
    ids=["0d", "0d-big-endian", "empty-0x3", "empty-2x0x4", "3d", "5d"],
)
def test_numpy_shapes(arr):
    np_roundtrip(arr)


def test_numpy_fortran_and_strided_input():
    fortran = np.asfortranarray(np.arange(12, dtype="float32").reshape(3, 4))
    assert not fortran.flags.c_contiguous
    out = np_roundtrip(fortran)
    assert np.array_equal(out, fortran)
    strided = np.arange(40).reshape(5, 8)[::2, 1::3]
    assert np.array_equal(np_roundtrip(strided), strided)


@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_large_arrays(order):
    # >= 64 KiB takes the copy-once path (a view of the data joined to the header)
    arr = np.asarray(rng.random((300, 70)), order=order).astype(">f4", order=order)
    assert arr.nbytes >= 1 << 16
    out = np_roundtrip(arr)
    assert np.array_equal(out, arr)
    strided = np.arange(200_000, dtype="int64").reshape(400, 500)[::3, ::2]
    assert np.array_equal(np_roundtrip(strided), strided)


def test_numpy_zero_itemsize_dtype():
    np_roundtrip(np.zeros((2, 3), dtype="V0"))


def test_numpy_loads_shares_the_buffer():
    arr = np.arange(6, dtype="<i4").reshape(2, 3)
    data = NUMPY.dumps(arr)
    out = NUMPY.loads(data)
    assert not out.flags.writeable  # backed by immutable bytes
    buf = bytearray(data)
    out = NUMPY.loads(buf)
    assert out.flags.writeable
    buf[-4:] = (99).to_bytes(4, "little")  # last element, in place
    assert out[1, 2] == 99  # no copy was made
    view = NUMPY.loads(memoryview(data))
    assert np.array_equal(view, arr)


def test_numpy_header_is_short_and_data_aligned():
    arr = np.arange(4, dtype="<f8")
    data = NUMPY.dumps(arr)
    assert len(data) - arr.nbytes <= 32
    assert (len(data) - arr.nbytes) % 16 == 0
    assert data[len(data) - arr.nbytes :] == arr.tobytes()


@pytest.mark.parametrize(
    "value",
    [
        np.array([1, "a", None], dtype=object),
        np.zeros(2, dtype=[("a", "i4"), ("o", "O")]),
    ],
    ids=["object", "structured-with-object"],
)
def test_numpy_object_dtype_rejected(value):
    with pytest.raises(CodecError, match="numpy cannot encode an array of dtype"):
        NUMPY.dumps(value)


@pytest.mark.parametrize("value", [[1, 2, 3], np.float64(1.5), b"raw", None])
def test_numpy_non_array_rejected(value):
    with pytest.raises(CodecError, match=f"type {type(value).__name__}") as info:
        NUMPY.dumps(value)
    assert "np.asarray" in info.value.hint


def test_numpy_truncated_data_rejected():
    data = NUMPY.dumps(np.arange(10, dtype="int64"))
    with pytest.raises(CodecError, match="numpy cannot decode"):
        NUMPY.loads(data[:-1])
    with pytest.raises(CodecError, match="numpy cannot decode"):
        NUMPY.loads(data + b"\x00")


def test_numpy_to_json():
    arr = np.array([[1, 2], [3, 4]], dtype=">i2")
    assert NUMPY.to_json(arr) == {"dtype": ">i2", "shape": [2, 2], "data": [[1, 2], [3, 4]]}
    complex_arr = np.array([1 + 2j, np.nan])
    json.dumps(NUMPY.to_json(NUMPY.dumps(complex_arr)))  # also accepts the stored bytes


# --------------------------------------------------------------------------------------------
# FlatBuffers

USER = flatbuffers_codec(User)


def make_user(**fields) -> UserT:
    user = UserT()
    user.id = fields.get("id", 42)
    user.name = fields.get("name", "Ada Lovelace")
    user.email = fields.get("email", "ada@example.com")
    user.age = fields.get("age", 36)
    user.score = fields.get("score", 99.5)
    user.tags = fields.get("tags", ["math", "engines"])
    return user


def test_flatbuffers_codec_name_and_classes():
    assert USER.name == "flatbuffers:User"
    assert USER.object_class is UserT
    assert isinstance(USER, Codec)


def test_flatbuffers_roundtrip_fields():
    data = USER.dumps(make_user(id=2**64 - 1, score=-0.25))
    assert type(data) is bytes
    user = USER.loads(data)
    assert isinstance(user, User)
    assert user.Id() == 2**64 - 1
    assert user.Name() == b"Ada Lovelace"  # flatbuffers' Python runtime returns strings as bytes
    assert user.Email() == b"ada@example.com"
    assert user.Age() == 36
    assert user.Score() == -0.25
    assert [user.Tags(i) for i in range(user.TagsLength())] == [b"math", b"engines"]


def test_flatbuffers_missing_fields_use_defaults():
    empty = UserT()
    user = USER.loads(USER.dumps(empty))
    assert (user.Id(), user.Name(), user.Age(), user.TagsLength()) == (0, None, 0, 0)
    assert USER.to_json(user) == {
        "id": 0,
        "name": None,
        "email": None,
        "age": 0,
        "score": 0.0,
        "tags": None,
    }


def test_flatbuffers_loads_is_lazy():
    tags = [f"tag-{i:05d}" for i in range(20_000)]
    data = USER.dumps(make_user(name="alice", tags=tags))
    buf = bytearray(data)
    user = USER.loads(buf)
    # The loaded object holds nothing but a reference to the same buffer and a position:
    # User has __slots__ = ["_tab"], so it cannot hold a decoded list of 20k tags.
    assert User.__slots__ == ["_tab"]
    assert user._tab.Bytes is buf
    # Fields are read from the buffer when accessed, not when loaded: change the stored name
    # after loads() and the accessor sees the new bytes.
    at = buf.find(b"alice")
    buf[at : at + 5] = b"ALICE"
    assert user.Name() == b"ALICE"
    assert user.Tags(12_345) == b"tag-12345"
    assert user.TagsLength() == 20_000


def test_flatbuffers_loads_reads_no_field(monkeypatch):
    data = USER.dumps(make_user(tags=["a", "b", "c"]))
    reads: list[str] = []
    table = flatbuffers.table.Table
    for method in ("String", "Vector", "VectorLen", "Get", "Offset"):
        original = getattr(table, method)

        def spy(self, *args, _name=method, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(table, method, spy)
    user = USER.loads(data)
    assert reads == []  # loads() only located the root table
    assert user.Tags(1) == b"b"
    # one field, read on access (Vector and String read their lengths/offsets with Get)
    assert [name for name in reads if name != "Get"] == ["Offset", "Vector", "String"]


def test_flatbuffers_loads_memoryview_without_copy():
    data = USER.dumps(make_user())
    view = memoryview(data)
    user = USER.loads(view)
    assert user._tab.Bytes is view
    assert user.Email() == b"ada@example.com"


def test_flatbuffers_dumps_finished_buffer_as_is():
    data = USER.dumps(make_user())
    assert USER.dumps(data) is data
    assert USER.dumps(bytearray(data)) == data
    # a lazy root object is stored as its buffer, without re-packing
    assert USER.dumps(USER.loads(data)) == data


def test_flatbuffers_to_json():
    user = make_user(tags=["a", "é"])
    expected = {
        "id": 42,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "age": 36,
        "score": 99.5,
        "tags": ["a", "é"],
    }
    data = USER.dumps(user)
    assert USER.to_json(USER.loads(data)) == expected
    assert USER.to_json(data) == expected
    assert USER.to_json(user) == expected
    json.dumps(expected)


class UserWithoutObjectApi(User):
    """A table class whose module has no ``UserWithoutObjectApiT``: to_json reads accessors."""

    __slots__ = ()


def test_flatbuffers_to_json_without_object_api():
    codec = flatbuffers_codec(UserWithoutObjectApi)
    assert codec.object_class is None
    shown = codec.to_json(codec.loads(USER.dumps(make_user())))
    assert shown == {
        "Id": 42,
        "Name": "Ada Lovelace",
        "Email": "ada@example.com",
        "Age": 36,
        "Score": 99.5,
        "Tags": ["math", "engines"],
    }
    with pytest.raises(CodecError, match="cannot encode a value of type dict"):
        codec.dumps({"id": 1})


class OldStyleUser:
    """Like code from older flatc: only GetRootAs<Name>(buf, offset), offset without default."""

    __slots__ = ["_tab"]

    @classmethod
    def GetRootAsOldStyleUser(cls, buf, offset):
        x = cls()
        x.Init(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, offset) + offset)
        return x

    Init = User.Init
    Name = User.Name


def test_flatbuffers_old_style_get_root():
    codec = flatbuffers_codec(OldStyleUser)
    assert codec.name == "flatbuffers:OldStyleUser"
    user = codec.loads(USER.dumps(make_user(name="old")))
    assert type(user) is OldStyleUser
    assert user.Name() == b"old"


@pytest.mark.parametrize("bad", [UserT, dict, "User", 3])
def test_flatbuffers_codec_needs_a_table_class(bad):
    with pytest.raises(SchemaError):
        flatbuffers_codec(bad)


def test_flatbuffers_codec_checks_builder_size():
    with pytest.raises(SchemaError, match="builder_size"):
        flatbuffers_codec(User, builder_size=0)
    small = flatbuffers_codec(User, builder_size=8)  # the builder grows as needed
    assert small.loads(small.dumps(make_user(tags=["x" * 1000]))).Tags(0) == b"x" * 1000


@pytest.mark.parametrize(
    "value",
    [{"id": 1}, "a string", 5, object()],
)
def test_flatbuffers_dumps_rejects_other_types(value):
    with pytest.raises(CodecError, match="flatbuffers:User cannot encode a value of type") as info:
        USER.dumps(value)
    assert "UserT" in info.value.hint


def test_flatbuffers_dumps_rejects_another_tables_object():
    class MonsterT:  # e.g. the object-API class of another table: packing it would store garbage
        def Pack(self, builder):
            return builder.CreateString("not a user")

    with pytest.raises(CodecError, match="cannot encode a value of type MonsterT") as info:
        USER.dumps(MonsterT())
    assert "UserT" in info.value.hint


def test_flatbuffers_dumps_bad_field_is_codec_error():
    with pytest.raises(CodecError, match="flatbuffers:User cannot encode this UserT"):
        USER.dumps(make_user(name=12345))
    with pytest.raises(CodecError, match="flatbuffers:User cannot encode this UserT"):
        USER.dumps(make_user(id=-1))  # ulong


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x01", b"\xff\xff\xff\x7f" + bytes(8), b"\x04\x00\x00\x00\xff\xff\xff\x7f"],
    ids=["empty", "short", "root-out-of-bounds", "vtable-out-of-bounds"],
)
def test_flatbuffers_garbage(garbage):
    with pytest.raises(CodecError, match="flatbuffers:User cannot decode"):
        USER.loads(garbage)
    with pytest.raises(CodecError, match="cannot store these bytes as a User"):
        USER.dumps(garbage)


# --------------------------------------------------------------------------------------------
# registry


class Rot13Codec:
    """A custom codec: UTF-8 text, rot13'd (to prove it is really this codec being used)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def dumps(self, obj):
        return _rot13(obj).encode()

    def loads(self, data):
        return _rot13(bytes(data).decode())

    def to_json(self, obj):
        return obj


def _rot13(s: str) -> str:
    import codecs as std_codecs

    return std_codecs.encode(s, "rot13")


@pytest.fixture
def codec_name():
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    registry._registry.pop(name, None)


def test_builtin_codecs_registered():
    assert {"cbor", "msgpack", "json", "bytes", "numpy"} <= set(codec_names())
    for name in ("cbor", "msgpack", "json", "bytes", "numpy"):
        codec = get_codec(name)
        assert codec.name == name
        assert get_codec(name) is codec


def test_register_and_get_custom_codec(codec_name):
    codec = Rot13Codec(codec_name)
    register_codec(codec_name, codec)
    assert get_codec(codec_name) is codec
    assert codec_name in codec_names()
    assert get_codec(codec_name).dumps("hello") == b"uryyb"


def test_get_codec_passes_instances_through():
    codec = Rot13Codec("unregistered")
    assert get_codec(codec) is codec
    assert get_codec(USER) is USER


def test_duplicate_codec_name_rejected(codec_name):
    first, second = Rot13Codec(codec_name), Rot13Codec(codec_name)
    register_codec(codec_name, first)
    with pytest.raises(SchemaError, match="already registered") as info:
        register_codec(codec_name, second)
    assert "replace=True" in info.value.hint
    assert get_codec(codec_name) is first
    register_codec(codec_name, second, replace=True)
    assert get_codec(codec_name) is second


def test_builtin_name_cannot_be_taken():
    with pytest.raises(SchemaError, match="'cbor' is already registered"):
        register_codec("cbor", Rot13Codec("cbor"))
    with pytest.raises(SchemaError, match="'numpy' is already registered"):
        register_codec("numpy", Rot13Codec("numpy"))
    assert get_codec("cbor").loads(get_codec("cbor").dumps([1])) == [1]


def test_unknown_codec_lists_known_names():
    with pytest.raises(SchemaError) as info:
        get_codec("protobuf")
    message = info.value.message
    assert "unknown codec 'protobuf'" in message
    for name in ("bytes", "cbor", "json", "msgpack", "numpy"):
        assert name in message


@pytest.mark.parametrize("bad", [object(), None, b"not-a-codec-object"])
def test_non_codec_rejected(bad, codec_name):
    with pytest.raises(SchemaError, match="is not a codec"):
        register_codec(codec_name, bad)
    with pytest.raises(SchemaError, match="is not a codec"):
        get_codec(bad)


def test_register_rejects_bad_names():
    with pytest.raises(SchemaError, match="non-empty str"):
        register_codec("", Rot13Codec(""))
