"""The Codec protocol and the process-wide registry that resolves a table's codec by name.

The embedded store and the shard daemon resolve names through the same registry, so a schema
means the same bytes on both sides. The built-in codecs are registered here; numpy's is built on
first use (it imports numpy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from lmshard.codecs.numpy_arrays import NumpyCodec
from lmshard.codecs.standard import BytesCodec, CborCodec, JsonCodec, MsgpackCodec
from lmshard.errors import SchemaError


@runtime_checkable
class Codec(Protocol):
    """What a table needs to store values: a name and a pair of functions (plus a debug view).

    ``dumps`` must return ``bytes``; ``loads`` must accept ``bytes`` and ``memoryview`` (LMDB hands
    out memoryviews when reading with ``buffers=True``). Both should raise
    :class:`~lmshard.errors.CodecError` on bad input. ``to_json`` turns a *decoded* value into
    something :func:`json.dumps` accepts, for debugging and ``marshal()``. A codec whose
    values must start at the stored value's first byte (aligned data) sets
    ``carries_expiry = False``: tables declared with ``ttl`` then refuse it.
    """

    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes | memoryview) -> Any: ...

    def to_json(self, obj: Any) -> Any: ...


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


for _codec in (CborCodec(), MsgpackCodec(), JsonCodec(), BytesCodec()):
    register_codec(_codec.name, _codec)
del _codec

