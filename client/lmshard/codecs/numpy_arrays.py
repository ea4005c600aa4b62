"""The ``"numpy"`` codec: one ``numpy.ndarray`` per value, decoded without copying.

dtype (byte order included), shape and data are preserved. ``loads`` returns an array that
*shares* the given buffer: it is read-only when the buffer is ``bytes`` (or a read-only
memoryview, e.g. LMDB with ``buffers=True``), and it is only valid as long as that buffer is;
``.copy()`` it to keep or modify it.

numpy is imported when the codec is first built (``get_codec("numpy")``), not with this module,
so ``import lmshard`` stays cheap for processes that store no arrays.
"""

from __future__ import annotations

import ast
import math
import struct
from typing import Any

from lmshard.codecs.failures import DECODE_ERRORS, HINTS, decode_error
from lmshard.codecs.json_view import jsonable
from lmshard.errors import CodecError

# Layout: tag (1 byte), ndim (uint8), len(descr) (uint16 LE), descr (UTF-8), shape (ndim x uint64
# LE), zero padding to a multiple of 16 bytes, then the raw C-order data. The padding keeps the
# data as aligned as the buffer itself is.
_NP_TAG = 0xA1  # "array, format version 1"
_NP_HEAD = struct.Struct("<BBH")
_NP_ALIGN = 16
_NP_CACHE_MAX = 512  # distinct (dtype, ndim) headers remembered, each way
_NP_JOIN_MIN = 1 << 16  # from this size on, join a view of the data rather than tobytes() + concat


class NumpyCodec:
    """One ``numpy.ndarray`` per value; it shares the buffer it was read from."""

    name = "numpy"
    carries_expiry = False
    """Arrays are aligned to 16 bytes from the value's first byte: no room for a row expiry."""

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
                hint=HINTS["numpy"],
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
                raise decode_error(
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
        except (*DECODE_ERRORS, SyntaxError, KeyError, AttributeError) as exc:
            raise decode_error("numpy", data, exc) from exc

    def _new_decoder(self, data: Any, prefix: bytes) -> tuple[Any, struct.Struct, int]:
        np = self._np
        tag, ndim, _ = _NP_HEAD.unpack_from(prefix)
        if tag != _NP_TAG:
            raise decode_error("numpy", data, f"bad header byte 0x{tag:02x}")
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
            return jsonable(obj)
        return {
            "dtype": jsonable(np.lib.format.dtype_to_descr(obj.dtype)),
            "shape": list(obj.shape),
            "data": jsonable(obj.tolist()),
        }

