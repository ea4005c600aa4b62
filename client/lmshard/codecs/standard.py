"""The built-in codecs every process has: cbor, msgpack, json and bytes (see ``lmshard.codecs``).

Each exposes ``dumps``/``loads`` as plain attributes holding a closure that calls the C function
inside a ``try``, which keeps them within a few percent of calling the library directly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import cbor2
import msgpack

from lmshard.codecs.failures import DECODE_ERRORS, ENCODE_ERRORS, HINTS, decode_error, encode_error
from lmshard.codecs.json_view import jsonable
from lmshard.errors import CodecError


class CborCodec:
    """cbor2 with its defaults (canonical=False, no value sharing, timezone-aware datetimes)."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "cbor"
        dumps_, loads_ = cbor2.dumps, cbor2.loads

        def dumps(obj: Any) -> bytes:
            try:
                return dumps_(obj)
            except ENCODE_ERRORS as exc:
                raise encode_error("cbor", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                return loads_(data)
            except DECODE_ERRORS as exc:
                raise decode_error("cbor", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return jsonable(obj)


class _PackerLocal(threading.local):
    # One msgpack Packer per thread: reusing a Packer skips msgpack.packb's per-call Packer
    # construction (~1/3 of its time), and a Packer must not be shared between threads (its buffer
    # is not locked, and a finalizer or an items() override can switch threads mid-pack). A failed
    # pack() empties the buffer, so an error leaves no residue for the next value.
    def __init__(self) -> None:
        self.pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


class MsgpackCodec:
    """msgpack: ``use_bin_type=True``, ``raw=False``, ``strict_map_key=False``."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "msgpack"
        local = _PackerLocal()
        unpackb = msgpack.unpackb

        def dumps(obj: Any) -> bytes:
            try:
                return local.pack(obj)
            except ENCODE_ERRORS as exc:
                raise encode_error("msgpack", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                # raw=False (str as str) is msgpack >= 1.0's default; each kwarg costs
                return unpackb(data, strict_map_key=False)
            except DECODE_ERRORS as exc:
                raise decode_error("msgpack", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return jsonable(obj)


class JsonCodec:
    """stdlib json: ``separators=(",", ":")``, ``ensure_ascii=False``, UTF-8 bytes."""

    __slots__ = ("name", "dumps", "loads")

    def __init__(self) -> None:
        self.name = "json"
        encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        decode = json.JSONDecoder().decode

        def dumps(obj: Any) -> bytes:
            try:
                return encode(obj).encode("utf-8")
            except ENCODE_ERRORS as exc:
                raise encode_error("json", obj, exc) from exc

        def loads(data: bytes | memoryview) -> Any:
            try:
                return decode(str(data, "utf-8"))  # str() takes memoryviews; json.loads doesn't
            except DECODE_ERRORS as exc:
                raise decode_error("json", data, exc) from exc

        self.dumps: Callable[[Any], bytes] = dumps
        self.loads: Callable[[bytes | memoryview], Any] = loads

    def to_json(self, obj: Any) -> Any:
        return jsonable(obj)


class BytesCodec:
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
            f"bytes cannot encode a value of type {type(obj).__name__}", hint=HINTS["bytes"]
        )

    def to_json(self, obj: Any) -> Any:
        return jsonable(obj)

