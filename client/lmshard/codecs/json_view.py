"""A JSON-safe view of a decoded value (each codec's ``to_json``), for debugging and ``marshal()``.

Bytes become ``{"$base64": ...}`` (or text, for FlatBuffers strings), non-finite floats strings,
sets sorted lists, datetimes ISO strings, numpy values lists, FlatBuffers tables dicts of their
accessors; anything else its ``str()``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import inspect
import math
from collections.abc import Mapping
from typing import Any

import cbor2

_MAX_JSON_DEPTH = 64


def jsonable(obj: Any, text: bool = False, depth: int = 0) -> Any:
    """A JSON-safe copy of ``obj`` for debugging. ``text``: bytes are UTF-8 text (FlatBuffers)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float, bytes, bytearray, memoryview)):
        return _scalar(obj, text)
    if depth >= _MAX_JSON_DEPTH:
        return f"<nested deeper than {_MAX_JSON_DEPTH}: {type(obj).__name__}>"
    depth += 1
    if isinstance(obj, (Mapping, list, tuple, set, frozenset)):
        return _container(obj, text, depth)
    return _other(obj, text, depth)


def _scalar(obj: int | float | bytes | bytearray | memoryview, text: bool) -> Any:
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # "nan", "inf", "-inf"
    if text:
        return bytes(obj).decode("utf-8", "backslashreplace")
    return {"$base64": base64.b64encode(obj).decode("ascii")}


def _container(obj: Any, text: bool, depth: int) -> Any:
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str) else repr(k): jsonable(v, text, depth) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, text, depth) for v in obj]
    items = [jsonable(v, text, depth) for v in obj]  # a set: sorted when its items allow
    try:
        items.sort()
    except TypeError:
        pass
    return items


def _other(obj: Any, text: bool, depth: int) -> Any:
    if isinstance(obj, complex):
        return [jsonable(obj.real), jsonable(obj.imag)]
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, cbor2.CBORTag):
        return {"$tag": obj.tag, "value": jsonable(obj.value, text, depth)}
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist) and type(obj).__module__ == "numpy":
        return jsonable(tolist(), text, depth)
    if hasattr(obj, "_tab"):  # a lazy FlatBuffers table/struct without an object-API twin
        return _flatbuffers_accessors(obj, depth)
    if callable(getattr(obj, "Pack", None)) and hasattr(obj, "__dict__"):  # FlatBuffers "T" obj
        return {k: jsonable(v, text, depth) for k, v in vars(obj).items() if not k.startswith("_")}
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
                    out[attr] = jsonable(method(), True, depth)
                elif len(required) == 1 and callable(getattr(obj, attr + "Length", None)):
                    length = getattr(obj, attr + "Length")()
                    out[attr] = [jsonable(method(j), True, depth) for j in range(length)]
            except Exception as exc:  # a corrupt buffer: show the problem, keep the rest
                out[attr] = f"<error: {type(exc).__name__}: {exc}>"
    return out

