"""The CodecError a codec raises, naming the codec and the offending type, with a hint.

The codecs catch only the exception types listed here around the library call (a ``try`` costs
nothing until something is raised) and turn them into :class:`~lmshard.errors.CodecError`.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import cbor2

from lmshard.errors import CodecError

# What the libraries raise for a value they cannot encode / bytes they cannot decode.
ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, cbor2.CBORError)
DECODE_ERRORS = (
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

HINTS = {
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


def encode_error(codec: str, obj: Any, exc: BaseException) -> CodecError:
    """The CodecError for a value ``codec`` could not encode, naming the type it choked on."""
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
    return CodecError(message, hint=HINTS.get(codec, "pass a value this codec can encode"))


def decode_error(codec: str, data: Any, exc: BaseException | str) -> CodecError:
    """The CodecError for bytes ``codec`` could not decode (another codec wrote them, or they
    are corrupt)."""
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

