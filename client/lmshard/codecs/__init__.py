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

Modules: ``registry`` (the Codec protocol, register/get by name), ``standard`` (cbor, msgpack,
json, bytes), ``numpy_arrays``, ``flatbuffers_tables``, with ``failures`` (the CodecError each
codec raises) and ``json_view`` (``to_json``) shared by them.
"""

from __future__ import annotations

from lmshard.codecs.flatbuffers_tables import FlatBuffersCodec, flatbuffers_codec
from lmshard.codecs.numpy_arrays import NumpyCodec
from lmshard.codecs.registry import Codec, codec_names, get_codec, register_codec

__all__ = [
    "Codec",
    "FlatBuffersCodec",
    "NumpyCodec",
    "codec_names",
    "flatbuffers_codec",
    "get_codec",
    "register_codec",
]
