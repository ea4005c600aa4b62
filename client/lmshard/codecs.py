"""Value codecs: how a table turns a Python value into the bytes stored in LMDB, and back.

A codec is any object with ``name``, ``dumps``, ``loads`` and ``to_json`` (the :class:`Codec`
protocol). Tables name their codec in the schema; :func:`get_codec` resolves the name through a
process-wide registry that the embedded store and the shard daemon share. Built-in codecs:

``"cbor"``
    cbor2. Round-trips dict/list/str/bytes/int (any size)/float/bool/None, sets, datetimes with a
    timezone, Decimal, UUID, ... Lists used as dict keys come back as tuples.
``"msgpack"``
    msgpack (``use_bin_type=True``, ``raw=False``, ``strict_map_key=False`` so int-keyed dicts
    round-trip). Ints must fit in 64 bits; tuples come back as lists; no sets or datetimes.
``"json"``
    stdlib json, compact separators, UTF-8 output (non-ASCII text is stored as UTF-8, not
    ``\\uXXXX`` escapes). Tuples come back as lists and non-str dict keys as str keys.
``"bytes"``
    Identity: stores bytes/bytearray/memoryview as is and returns ``bytes``.
``"numpy"``
    One ``numpy.ndarray`` per value: dtype (byte order included), shape and data are preserved.
    :meth:`~NumpyCodec.loads` returns an array that *shares* the given buffer (no copy): it is
    read-only when the buffer is ``bytes`` (or a read-only memoryview, e.g. LMDB with
    ``buffers=True``), and it is only valid as long as that buffer is; ``.copy()`` it to keep or
    modify it.

``flatbuffers_codec(TableClass)`` builds a codec for a flatc-generated table class; it is not
registered automatically (register it under its ``name`` if a schema refers to it by name).

numpy and flatbuffers (which imports numpy) are imported only once a numpy codec or a FlatBuffers
codec is built, so ``import lmshard`` stays cheap for processes that use neither.

Encoding or decoding failures raise :class:`~lmshard.errors.CodecError` naming the codec and the
offending type. For speed, the cbor/msgpack/json codecs expose ``dumps``/``loads`` as plain
attributes holding a closure that calls the C function inside a ``try`` (zero-cost in Python 3.11
until something is raised): measured within ~5% of calling cbor2 directly on a 100-byte dict, and
msgpack's ``dumps`` is faster than ``msgpack.packb`` (it reuses a per-thread Packer). The bytes
codec's ``loads`` is the ``bytes`` builtin itself.

Known library behaviours (not worked around, to keep the fast path fast): cbor2 ignores trailing
bytes after the first item when decoding; cbor2 6.x refuses to *decode* containers nested more than
400 deep but *encodes* them, and its C encoder crashes the process (segfault) on lists nested
~10,000 deep; msgpack dicts with list/tuple keys encode but do not decode.
"""

from __future__ import annotations

import ast
import base64
import datetime as _dt
import inspect
import json
import math
import re
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import cbor2
import msgpack

from lmshard.errors import CodecError, SchemaError

__all__ = [
    "Codec",
    "codec_names",
    "flatbuffers_codec",
    "get_codec",
    "register_codec",
]


@runtime_checkable
class Codec(Protocol):
    """What a table needs to store values: a name and a pair of functions (plus a debug view).

    ``dumps`` must return ``bytes``; ``loads`` must accept ``bytes`` and ``memoryview`` (LMDB hands
    out memoryviews when reading with ``buffers=True``). Both should raise
    :class:`~lmshard.errors.CodecError` on bad input. ``to_json`` turns a *decoded* value into
    something :func:`json.dumps` accepts, for debugging and ``marshal()``.
    """

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes | memoryview) -> Any: ...

    def to_json(self, obj: Any) -> Any: ...


# --------------------------------------------------------------------------------------------
# errors

# What the libraries raise for a value they cannot encode / bytes they cannot decode.
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, cbor2.CBORError)
_DECODE_ERRORS = (
    ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError, msgpack's errors
    TypeError,
    OverflowError,
    RecursionError,
    IndexError,
    EOFError,
    struct.error,
    cbor2.CBORError,
)

# Where each library's message names the type it choked on.
_TYPE_IN_MESSAGE = re.compile(
    r"<class '([\w.]+)'>"  # cbor2: cannot encode type <class 'object'>
    r"|serialize '([\w.]+)' object"  # msgpack: can not serialize 'set' object
    r"|Object of type ([\w.]+) is not"  # json: Object of type set is not JSON serializable
    r"|keys must be .*, not ([\w.]+)"  # json: keys must be str, int, ..., not tuple
)

_HINTS = {
    "cbor": "convert it to a type cbor2 can encode (dict, list, str, bytes, int, float, bool, "
    "None, set, timezone-aware datetime, Decimal, UUID) before storing it",
    "msgpack": "msgpack stores dict, list/tuple, str, bytes, int (64-bit), float, bool and None; "
    "convert the value first, or use the cbor codec",
    "json": "json stores dict (str keys), list/tuple, str, int, float, bool and None; convert "
    "the value first, or use the cbor codec for bytes, sets and datetimes",
    "bytes": "the bytes codec stores raw bytes only: pass bytes, bytearray or memoryview "
    "(use str.encode() for text, or pick another codec)",
    "numpy": "pass a numpy.ndarray, e.g. np.asarray(x)",
}


def _encode_error(codec: str, obj: Any, exc: BaseException) -> CodecError:
    top = type(obj).__name__
    detail = str(exc)
    match = _TYPE_IN_MESSAGE.search(detail)
    if match:
        bad = next(g for g in match.groups() if g)
        detail = ""
    elif isinstance(exc, OverflowError):
        bad, detail = "int", "out of range"
    else:
        bad = top
    if isinstance(exc, RecursionError) or "recursion" in detail:
        detail = "nested too deeply (or contains itself)"
    message = f"{codec} cannot encode a value of type {bad}"
    if bad.rpartition(".")[2] != top:
        message += f" (inside a {top})"
    if detail:
        message += f": {detail}"
    return CodecError(message, hint=_HINTS.get(codec, "pass a value this codec can encode"))


def _decode_error(codec: str, data: Any, exc: BaseException | str) -> CodecError:
    try:
        size = f"{len(data)}-byte "
    except TypeError:
        size = ""
    if isinstance(exc, BaseException):
        exc = f"{type(exc).__name__}: {exc}"
    return CodecError(
        f"{codec} cannot decode the {size}value ({exc})",
        hint=f"the value was not written with the {codec!r} codec, or it is corrupt; check the "
        "table's codec in the schema",
    )


# --------------------------------------------------------------------------------------------
# JSON-safe view (to_json)

_MAX_JSON_DEPTH = 64


def _jsonable(obj: Any, text: bool = False, depth: int = 0) -> Any:
    """A JSON-safe copy of ``obj`` for debugging. ``text``: bytes are UTF-8 text (FlatBuffers)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # "nan", "inf", "-inf"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if text:
            return bytes(obj).decode("utf-8", "backslashreplace")
        return {"$base64": base64.b64encode(obj).decode("ascii")}
    if depth >= _MAX_JSON_DEPTH:
        return f"<nested deeper than {_MAX_JSON_DEPTH}: {type(obj).__name__}>"
    depth += 1
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str) else repr(k): _jsonable(v, text, depth) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, text, depth) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_jsonable(v, text, depth) for v in obj]
        try:
            items.sort()
        except TypeError:
            pass
        return items
    if isinstance(obj, complex):
        return [_jsonable(obj.real), _jsonable(obj.imag)]
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, cbor2.CBORTag):
        return {"$tag": obj.tag, "value": _jsonable(obj.value, text, depth)}
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist) and type(obj).__module__ == "numpy":
        return _jsonable(tolist(), text, depth)
    if hasattr(obj, "_tab"):  # a lazy FlatBuffers table/struct without an object-API twin
        return _flatbuffers_accessors(obj, depth)
    if callable(getattr(obj, "Pack", None)) and hasattr(obj, "__dict__"):  # FlatBuffers "T" obj
        return {k: _jsonable(v, text, depth) for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)  # Decimal, UUID, Fraction, IP addresses, ...


def _flatbuffers_accessors(obj: Any, depth: int) -> dict[str, Any]:
    """Read every accessor of a lazy FlatBuffers object: ``X()`` and vectors ``X(j)``/``XLength()``.

    Keys are the accessor names (``Name``, ``Tags``), not the schema's field names.
    """
    cls = type(obj)
    out: dict[str, Any] = {}
    for attr in dir(cls):
        if (
            not attr[:1].isupper()
            or attr == "Init"
            or attr.startswith(("GetRootAs", "GetSizePrefixedRootAs", "Mutate"))
            or attr.endswith("BufferHasIdentifier")
        ):
            continue
        for suffix in ("IsNone", "Length", "AsNumpy"):
            if attr.endswith(suffix) and hasattr(cls, attr[: -len(suffix)]):
                break
        else:
            method = getattr(obj, attr)
            if not callable(method):
                continue
            try:
                params = inspect.signature(method).parameters.values()
            except (TypeError, ValueError):
                continue
            required = [
                p
                for p in params
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            try:
                if not required:
                    out[attr] = _jsonable(method(), True, depth)
                elif len(required) == 1 and callable(getattr(obj, attr + "Length", None)):
                    length = getattr(obj, attr + "Length")()
                    out[attr] = [_jsonable(method(j), True, depth) for j in range(length)]
            except Exception as exc:  # a corrupt buffer: show the problem, keep the rest
                out[attr] = f"<error: {type(exc).__name__}: {exc}>"
    return out


# --------------------------------------------------------------------------------------------
# cbor, msgpack, json, bytes


class _CborCodec:
    """cbor2 with its defaults (canonical=False, no value sharing, timezone-aware datetimes)."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "cbor"
        dumps_, loads_ = cbor2.dumps, cbor2.loads

        def dumps(obj: Any) -> bytes:
            try:
                return dumps_(obj)
            except _ENCODE_ERRORS as exc:
                raise _encode_error("cbor", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                return loads_(data)
            except _DECODE_ERRORS as exc:
                raise _decode_error("cbor", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return _jsonable(obj)


class _PackerLocal(threading.local):
    # One msgpack Packer per thread: reusing a Packer skips msgpack.packb's per-call Packer
    # construction (~1/3 of its time), and a Packer must not be shared between threads (its buffer
    # is not locked, and a finalizer or an items() override can switch threads mid-pack). A failed
    # pack() empties the buffer, so an error leaves no residue for the next value.
    def __init__(self) -> None:
        self.pack = msgpack.Packer(use_bin_type=True).pack


class _MsgpackCodec:
    """msgpack: ``use_bin_type=True``, ``raw=False``, ``strict_map_key=False``."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "msgpack"
        local = _PackerLocal()
        unpackb = msgpack.unpackb

        def dumps(obj: Any) -> bytes:
            try:
                return local.pack(obj)
            except _ENCODE_ERRORS as exc:
                raise _encode_error("msgpack", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                # raw=False (str as str) is msgpack >= 1.0's default; each kwarg costs
                return unpackb(data, strict_map_key=False)
            except _DECODE_ERRORS as exc:
                raise _decode_error("msgpack", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return _jsonable(obj)


class _JsonCodec:
    """stdlib json: ``separators=(",", ":")``, ``ensure_ascii=False``, UTF-8 bytes."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "json"
        encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        decode = json.JSONDecoder().decode

        def dumps(obj: Any) -> bytes:
            try:
                return encode(obj).encode("utf-8")
            except _ENCODE_ERRORS as exc:
                raise _encode_error("json", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                return decode(str(data, "utf-8"))  # str() takes memoryviews; json.loads doesn't
            except _DECODE_ERRORS as exc:
                raise _decode_error("json", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return _jsonable(obj)


class _BytesCodec:
    """Identity: values are bytes-like and stored as is; ``loads`` returns ``bytes``."""

    __slots__ = ("name", "loads")

    def __init__(self) -> None:
        self.name = "bytes"
        # bytes(b) returns b itself for a bytes object and copies a memoryview/bytearray.
        self.loads: Callable[[bytes | memoryview], Any] = bytes

    def dumps(self, obj: Any) -> bytes:
        if type(obj) is bytes:
            return obj
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj)
        # not bytes(obj): it would turn an int n into n zero bytes and a list of ints into bytes
        raise CodecError(
            f"bytes cannot encode a value of type {type(obj).__name__}", hint=_HINTS["bytes"]
        )

    def to_json(self, obj: Any) -> Any:
        return _jsonable(obj)


# --------------------------------------------------------------------------------------------
# numpy

# Layout: tag (1 byte), ndim (uint8), len(descr) (uint16 LE), descr (UTF-8), shape (ndim x uint64
# LE), zero padding to a multiple of 16 bytes, then the raw C-order data. The padding keeps the
# data as aligned as the buffer itself is.
_NP_TAG = 0xA1  # "array, format version 1"
_NP_HEAD = struct.Struct("<BBH")
_NP_ALIGN = 16
_NP_CACHE_MAX = 512  # distinct (dtype, ndim) headers remembered, each way
_NP_JOIN_MIN = 1 << 16  # from this size on, join a view of the data rather than tobytes() + concat


class NumpyCodec:
    """One ``numpy.ndarray`` per value; see the module docstring for the buffer-sharing caveat."""

    name = "numpy"

    def __init__(self) -> None:
        import numpy as np  # lazily: only tables that use this codec pay for importing numpy

        self._np = np
        self._ndarray = np.ndarray
        # (dtype, ndim) -> (header prefix, Struct packing the shape and the padding)
        self._encoders: dict[tuple[Any, int], tuple[bytes, struct.Struct]] = {}
        # header prefix -> (dtype, Struct unpacking the shape, data offset)
        self._decoders: dict[bytes, tuple[Any, struct.Struct, int]] = {}

    def dumps(self, arr: Any) -> bytes:
        if not isinstance(arr, self._ndarray):
            raise CodecError(
                f"numpy cannot encode a value of type {type(arr).__name__}: it needs an ndarray",
                hint=_HINTS["numpy"],
            )
        try:
            prefix, shape_struct = self._encoders[arr.dtype, arr.ndim]
        except KeyError:
            prefix, shape_struct = self._new_encoder(arr.dtype, arr.ndim)
        header = prefix + shape_struct.pack(*arr.shape)
        if arr.nbytes < _NP_JOIN_MIN:
            return header + arr.tobytes()  # tobytes() is C order, whatever the input's order
        try:
            # A view when the data is C-contiguous, else (Fortran order, strided views) a C-order
            # copy; join() then copies it once into the result.
            data: Any = arr.reshape(-1).view(self._np.uint8)
        except ValueError:  # zero-itemsize dtypes
            data = arr.tobytes()
        return b"".join((header, data))

    def _new_encoder(self, dtype: Any, ndim: int) -> tuple[bytes, struct.Struct]:
        if dtype.hasobject:
            raise CodecError(
                f"numpy cannot encode an array of dtype {dtype}: it holds Python objects",
                hint="convert it to a numeric, bool or structured dtype without object fields, or "
                "store it with the cbor codec",
            )
        if dtype.fields is None:
            descr = dtype.str.encode("ascii")  # '<i4', '>f8', '|b1', '<M8[ns]', ...
        else:  # structured: a list of (name, descr[, shape]) that descr_to_dtype() reverses
            descr = repr(self._np.lib.format.dtype_to_descr(dtype)).encode("utf-8")
        prefix = _NP_HEAD.pack(_NP_TAG, ndim, len(descr)) + descr
        pad = -(len(prefix) + 8 * ndim) % _NP_ALIGN
        encoder = prefix, struct.Struct(f"<{ndim}Q{pad}x")
        if len(self._encoders) >= _NP_CACHE_MAX:
            self._encoders.clear()
        self._encoders[dtype, ndim] = encoder
        return encoder

    def loads(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            end = _NP_HEAD.size + _NP_HEAD.unpack_from(data)[2]
            prefix = bytes(data[:end])
            try:
                dtype, shape_struct, offset = self._decoders[prefix]
            except KeyError:
                dtype, shape_struct, offset = self._new_decoder(data, prefix)
            shape = shape_struct.unpack_from(data, end)
            count = math.prod(shape)
            if len(data) - offset != count * dtype.itemsize:
                raise _decode_error(
                    "numpy",
                    data,
                    f"{len(data) - offset} data bytes for shape {shape} of dtype {dtype}",
                )
            if dtype.itemsize == 0:
                return self._np.empty(shape, dtype)
            arr = self._np.frombuffer(data, dtype, count, offset)
            return arr if len(shape) == 1 else arr.reshape(shape)
        except CodecError:
            raise
        except (*_DECODE_ERRORS, SyntaxError, KeyError, AttributeError) as exc:
            raise _decode_error("numpy", data, exc) from exc

    def _new_decoder(self, data: Any, prefix: bytes) -> tuple[Any, struct.Struct, int]:
        np = self._np
        tag, ndim, _ = _NP_HEAD.unpack_from(prefix)
        if tag != _NP_TAG:
            raise _decode_error("numpy", data, f"bad header byte 0x{tag:02x}")
        text = prefix[_NP_HEAD.size :].decode("utf-8")
        if text.startswith("["):  # structured: repr() of np.lib.format.dtype_to_descr()
            dtype = np.lib.format.descr_to_dtype(ast.literal_eval(text))
        else:
            dtype = np.dtype(text)
        if dtype.hasobject:
            raise ValueError(f"dtype {dtype} holds Python objects")
        offset = len(prefix) + 8 * ndim
        offset += -offset % _NP_ALIGN
        decoder = dtype, struct.Struct(f"<{ndim}Q"), offset
        if len(self._decoders) >= _NP_CACHE_MAX:
            self._decoders.clear()
        self._decoders[prefix] = decoder
        return decoder

    def to_json(self, obj: Any) -> Any:
        np = self._np
        if isinstance(obj, (bytes, bytearray, memoryview)):
            obj = self.loads(obj)
        if not isinstance(obj, np.ndarray):
            return _jsonable(obj)
        return {
            "dtype": _jsonable(np.lib.format.dtype_to_descr(obj.dtype)),
            "shape": list(obj.shape),
            "data": _jsonable(obj.tolist()),
        }


# --------------------------------------------------------------------------------------------
# FlatBuffers

_UOFFSET = struct.Struct("<I")
_SOFFSET = struct.Struct("<i")


class FlatBuffersCodec:
    """Values are FlatBuffers buffers; ``loads`` returns the lazy generated table object.

    The object returned by ``loads`` reads its fields from the given buffer on access: nothing is
    decoded up front, and the object is only valid as long as that buffer is (with LMDB
    ``buffers=True``, only inside the transaction; convert with ``TableT.InitFromObj(obj)`` or
    store ``bytes`` to keep it).
    """

    def __init__(self, table_class: type, builder_size: int = 1024) -> None:
        if not isinstance(table_class, type):
            raise SchemaError(
                f"flatbuffers_codec() needs a generated table class, not {table_class!r}",
                hint="pass the class, e.g. flatbuffers_codec(Monster) after "
                "`from mygame.Monster import Monster`",
            )
        cls_name = table_class.__name__
        get_root = getattr(table_class, "GetRootAs", None)
        if not callable(get_root):
            get_root = getattr(table_class, f"GetRootAs{cls_name}", None)
        if not callable(get_root):
            raise SchemaError(
                f"{table_class.__qualname__} is not a flatc-generated table class: it has no "
                f"GetRootAs() or GetRootAs{cls_name}()",
                hint="pass the reader class generated by `flatc --python` (e.g. Monster), not the "
                "object-API class (MonsterT)",
            )
        if not isinstance(builder_size, int) or builder_size <= 0:
            raise SchemaError(
                f"builder_size must be a positive int, not {builder_size!r}",
                hint="pass the typical encoded size in bytes (the builder grows as needed)",
            )
        twin = getattr(sys.modules.get(table_class.__module__), f"{cls_name}T", None)
        if not (callable(getattr(twin, "InitFromObj", None)) and hasattr(twin, "Pack")):
            twin = None
        # Imported here, not at module level: flatbuffers imports numpy, which would about double
        # the time `import lmshard` takes in processes without a FlatBuffers table. (table_class's
        # module has imported flatbuffers already, so this is only a lookup.)
        import flatbuffers

        self._flatbuffers = flatbuffers
        self.name = f"flatbuffers:{cls_name}"
        self.table_class: Any = table_class
        self.object_class: Any = twin  # the --gen-object-api class (TableT), or None
        self.builder_size = builder_size
        self._get_root = get_root

    def _check_root(self, data: Any) -> None:
        """Cheap sanity check (not a verifier): the root table and its vtable lie in the buffer."""
        size = len(data)
        if size < 8:
            raise _decode_error(self.name, data, "too short for a FlatBuffer")
        pos = _UOFFSET.unpack_from(data, 0)[0]
        if pos + 4 > size:
            raise _decode_error(self.name, data, f"root table offset {pos} is out of bounds")
        vtable = pos - _SOFFSET.unpack_from(data, pos)[0]
        if not 0 <= vtable <= size - 4:
            raise _decode_error(self.name, data, f"vtable offset {vtable} is out of bounds")

    def loads(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            self._check_root(data)
            return self._get_root(data, 0)
        except CodecError:
            raise
        except (*_DECODE_ERRORS, AttributeError) as exc:
            raise _decode_error(self.name, data, exc) from exc

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, (bytes, bytearray, memoryview)):  # an already finished buffer
            try:
                self._check_root(obj)
            except CodecError as exc:
                raise CodecError(
                    f"{self.name} cannot store these bytes as a {self.table_class.__name__}: "
                    f"{exc.message}",
                    hint="pass a finished FlatBuffers buffer (builder.Output()) or an object-API "
                    "instance",
                ) from None
            return bytes(obj)
        if isinstance(obj, self.table_class):  # a lazy object, e.g. from loads()
            buf = obj._tab.Bytes
            if obj._tab.Pos == _UOFFSET.unpack_from(buf, 0)[0]:  # the root of its buffer
                return bytes(buf)
            if self.object_class is None:
                raise CodecError(
                    f"{self.name} cannot encode a nested {type(obj).__name__} table object",
                    hint="generate the object API (flatc --gen-object-api) or pass bytes",
                )
            obj = self.object_class.InitFromObj(obj)
        twin = self.object_class
        if (twin is not None and not isinstance(obj, twin)) or not callable(
            getattr(obj, "Pack", None)
        ):
            want = twin.__name__ if twin is not None else "object-API (Pack())"
            raise CodecError(
                f"{self.name} cannot encode a value of type {type(obj).__name__}",
                hint=f"pass a {want} instance or a finished FlatBuffers buffer (bytes)",
            )
        builder = self._flatbuffers.Builder(self.builder_size)
        try:
            builder.Finish(obj.Pack(builder))
        except (*_ENCODE_ERRORS, struct.error, AttributeError, IndexError) as exc:
            raise CodecError(
                f"{self.name} cannot encode this {type(obj).__name__}: {type(exc).__name__}: {exc}",
                hint="check the types of its fields (str/bytes for strings, ints in range, lists "
                "for vectors)",
            ) from exc
        return bytes(memoryview(builder.Bytes)[builder.Head() :])

    def to_json(self, obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            obj = self.loads(obj)
        if isinstance(obj, self.table_class) and self.object_class is not None:
            obj = self.object_class.InitFromObj(obj)
        return _jsonable(obj, text=True)

    def __repr__(self) -> str:
        return f"<FlatBuffersCodec {self.name}>"


def flatbuffers_codec(table_class: type, *, builder_size: int = 1024) -> Codec:
    """A codec storing ``table_class`` FlatBuffers (a class generated by ``flatc --python``).

    ``dumps`` takes a finished buffer (``bytes``, stored as is after a bounds check), an object-API
    instance (``TableT``, packed with a fresh ``flatbuffers.Builder(builder_size)``), or a lazy
    ``table_class`` object (its buffer is reused when it is a root, else it is re-packed).
    ``loads`` returns ``table_class.GetRootAs(buf, 0)`` without decoding anything. The codec's
    name is ``"flatbuffers:<TableClass>"``.
    """
    return FlatBuffersCodec(table_class, builder_size)


# --------------------------------------------------------------------------------------------
# registry

_registry: dict[str, Codec] = {}
_lazy: dict[str, Callable[[], Codec]] = {"numpy": NumpyCodec}  # built on first get_codec()
_lock = threading.Lock()


def _check_codec(codec: Any) -> None:
    missing = [
        attr for attr in ("dumps", "loads", "to_json") if not callable(getattr(codec, attr, None))
    ]
    if not isinstance(getattr(codec, "name", None), str):
        missing.insert(0, "name")
    if missing:
        raise SchemaError(
            f"{codec!r} is not a codec: it has no usable {', '.join(missing)}",
            hint="a codec needs name (str), dumps(obj) -> bytes, loads(data) and to_json(obj)",
        )


def register_codec(name: str, codec: Codec, *, replace: bool = False) -> None:
    """Make ``codec`` available to schemas as ``name``.

    Raises :class:`~lmshard.errors.SchemaError` when ``name`` is taken (unless ``replace``) or
    ``codec`` lacks part of the :class:`Codec` protocol.
    """
    if not isinstance(name, str) or not name:
        raise SchemaError(
            f"a codec name must be a non-empty str, not {name!r}", hint="pass a name like 'cbor'"
        )
    _check_codec(codec)
    with _lock:
        if not replace and (name in _registry or name in _lazy):
            raise SchemaError(
                f"a codec named {name!r} is already registered",
                hint="choose another name, or pass replace=True to override it",
            )
        _lazy.pop(name, None)
        _registry[name] = codec


def codec_names() -> list[str]:
    """The registered codec names, sorted."""
    return sorted({*_registry, *_lazy})


def get_codec(spec: str | Codec) -> Codec:
    """The codec registered as ``spec``, or ``spec`` itself if it is already a codec object."""
    if isinstance(spec, str):
        codec = _registry.get(spec)
        if codec is not None:
            return codec
        with _lock:
            factory = _lazy.get(spec)
            if factory is not None:
                codec = _registry[spec] = factory()
                del _lazy[spec]
                return codec
        raise SchemaError(
            f"unknown codec {spec!r}; known codecs: {', '.join(codec_names())}",
            hint="use one of the known names, or register_codec() yours before opening the store",
        )
    _check_codec(spec)
    return spec


for _codec in (_CborCodec(), _MsgpackCodec(), _JsonCodec(), _BytesCodec()):
    register_codec(_codec.name, _codec)
del _codec
