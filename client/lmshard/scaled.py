"""Decimal amounts (prices, balances) stored as scaled int64: exact, compact, fast to compare.

``Scaled(decimals=8)`` stores 1.5 as the integer 150000000. Converting from ``Decimal``, ``str``
or ``int`` is exact (an amount with more decimals than the scale is refused unless a rounding
mode is given); converting back with :meth:`Scaled.to_decimal` is always exact. A ``float`` is
first read as the shortest decimal that prints as it (``repr``: 0.1 is "0.1", not
0.1000000000000000055...) and then rounded half-to-even to the scale, so what was typed is what is
stored. :meth:`Scaled.to_float` gives the float nearest the stored amount.

:func:`scaled_codec` is a table value codec built on this: ``value=scaled_codec(8)`` stores
8-byte big-endian int64 values and reads back ``Decimal``. For arrays (time series of prices)
:meth:`Scaled.to_int_array` and :meth:`Scaled.to_float_array` work on NumPy arrays at once.
"""

from __future__ import annotations

import decimal
import math
import struct
import threading
from decimal import Decimal
from typing import Any

from lmshard.codecs import Codec, get_codec, register_codec
from lmshard.errors import CodecError, SchemaError

MAX_DECIMALS = 18
"""The largest scale: 10**18 still fits int64, so one unit stays representable."""
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_INT64_DIGITS = 19
_INT64 = struct.Struct(">q")


def _exact_context(digits: int) -> decimal.Context:
    # Enough precision that shifting the exponent (scaleb) never rounds a digit away.
    return decimal.Context(prec=max(digits, _INT64_DIGITS) + 2, traps=[decimal.InvalidOperation])


_CONTEXT = _exact_context(_INT64_DIGITS)
_NUMBER = "pass a finite Decimal, str, int or float"


class ScaleError(CodecError):
    """An amount does not fit the declared scale: too many decimals, out of int64 range, or not
    a finite number."""

    hint = "round it first (to_int(x, rounding=...)), or declare a larger scale"


class Scaled:
    """A fixed decimal scale: amounts are integers counting units of ``10**-decimals``."""

    __slots__ = ("decimals", "factor", "_quantum")

    def __init__(self, decimals: int) -> None:
        if not isinstance(decimals, int) or isinstance(decimals, bool) or not (
            0 <= decimals <= MAX_DECIMALS
        ):
            raise SchemaError(
                f"decimals must be an int in 0..{MAX_DECIMALS}, not {decimals!r}",
                hint="pick the number of decimal places the amounts need, e.g. 8",
            )
        self.decimals = decimals
        self.factor: int = 10**decimals
        self._quantum = Decimal(1).scaleb(-decimals)

    def __repr__(self) -> str:
        return f"Scaled(decimals={self.decimals})"

    def to_int(self, x: Decimal | str | int | float, rounding: str | None = None) -> int:
        """The scaled integer for ``x``.

        Exact for ``Decimal``, ``str`` and ``int``: ScaleError if ``x`` has more decimals than
        the scale, unless ``rounding`` names a ``decimal`` rounding mode (e.g.
        ``decimal.ROUND_HALF_EVEN``). A float is taken as its shortest decimal repr and rounded
        half-to-even (or by ``rounding``). ScaleError past the int64 range or for NaN/infinity.
        """
        if isinstance(x, bool):
            raise ScaleError(f"{self!r} cannot store a bool", hint=_NUMBER)
        if isinstance(x, int):
            n = x * self.factor
        else:
            if isinstance(x, Decimal):
                d = x
            else:
                d, rounding = self._parse(x, rounding)
            if not d.is_finite():
                raise ScaleError(f"{self!r} cannot store {x!r}", hint=_NUMBER)
            if d and d.adjusted() + self.decimals > _INT64_DIGITS:
                raise self._out_of_range(x, f"{d:.3e}")
            scaled = d.scaleb(self.decimals, _exact_context(len(d.as_tuple().digits)))
            integral = scaled.to_integral_value(rounding=rounding or decimal.ROUND_HALF_EVEN)
            if rounding is None and integral != scaled:
                raise ScaleError(
                    f"{x!r} has more than {self.decimals} decimals; storing it would round it"
                )
            n = int(integral)
        if not INT64_MIN <= n <= INT64_MAX:
            raise self._out_of_range(x, n)
        return n

    def _parse(self, x: Any, rounding: str | None) -> tuple[Decimal, str | None]:
        """A float or str amount as a Decimal, with the rounding to_int applies to it."""
        if isinstance(x, float):
            if not math.isfinite(x):
                raise ScaleError(f"{self!r} cannot store {x!r}", hint=_NUMBER)
            return Decimal(repr(x)), rounding or decimal.ROUND_HALF_EVEN
        if isinstance(x, str):
            try:
                return Decimal(x.strip()), rounding
            except decimal.InvalidOperation:
                raise ScaleError(f"{x!r} is not a decimal number", hint=_NUMBER) from None
        raise ScaleError(f"{self!r} cannot store a {type(x).__name__}", hint=_NUMBER)

    def _out_of_range(self, x: Any, scaled: Any) -> ScaleError:
        return ScaleError(
            f"{x!r} is out of range for {self!r}: the scaled value {scaled} does not fit int64",
            hint=f"amounts up to about {INT64_MAX // self.factor:,} fit; use fewer decimals",
        )

    def to_decimal(self, n: int) -> Decimal:
        """The exact amount a scaled integer stands for, with exactly ``decimals`` places."""
        return Decimal(int(n)).scaleb(-self.decimals, _CONTEXT)

    def to_float(self, n: int) -> float:
        """The float nearest the amount (correctly rounded: integer true division)."""
        return int(n) / self.factor

    def quantize(self, x: Decimal | str, rounding: str = decimal.ROUND_HALF_EVEN) -> Decimal:
        """``x`` rounded to the scale: what :meth:`to_int` with ``rounding`` would store."""
        return self.to_decimal(self.to_int(Decimal(x), rounding=rounding))

    def to_int_array(self, values: Any) -> Any:
        """Scaled int64 array for an array of amounts, at NumPy speed.

        Floats are multiplied by ``10**decimals`` and rounded half-to-even (``numpy.rint``):
        the product is itself a float, so an amount whose decimal form sits exactly on a
        rounding tie (2.675 at 2 decimals) may land on the other side than :meth:`to_int`
        puts it. Integer arrays are scaled exactly; anything else (Decimals, strings) goes
        through :meth:`to_int` element by element. ScaleError for NaN, infinity or overflow.
        """
        import numpy as np

        arr = np.asarray(values)
        if arr.dtype.kind == "f":
            scaled = arr.astype(np.float64) * float(self.factor)
            if not np.isfinite(scaled).all():
                raise ScaleError(f"{self!r}: the array holds NaN or infinity", hint=_NUMBER)
            # float(2**63) is the first float past int64; every float below it converts.
            if (np.abs(scaled) >= 2.0**63).any():
                raise ScaleError(f"{self!r}: an amount in the array does not fit int64")
            return np.rint(scaled).astype(np.int64)
        if arr.dtype.kind in "iub":
            if arr.dtype.kind == "b":
                raise ScaleError(f"{self!r} cannot store bools")
            limit = INT64_MAX // self.factor
            if arr.size and (arr.max() > limit or arr.min() < -limit):
                raise ScaleError(f"{self!r}: an amount in the array does not fit int64")
            return arr.astype(np.int64) * np.int64(self.factor)
        flat = [self.to_int(x) for x in arr.reshape(-1).tolist()]
        return np.array(flat, dtype=np.int64).reshape(arr.shape)

    def to_float_array(self, ints: Any) -> Any:
        """Float64 amounts for an int64 array (exact up to 2**53 units, else nearest)."""
        import numpy as np

        return np.asarray(ints, dtype=np.int64) / float(self.factor)


class ScaledCodec:
    """Stores one amount per value as 8 bytes of big-endian int64; loads returns ``Decimal``."""

    __slots__ = ("name", "scale")

    def __init__(self, decimals: int) -> None:
        self.scale = Scaled(decimals)
        self.name = f"scaled:{decimals}"

    def dumps(self, obj: Any) -> bytes:
        return _INT64.pack(self.scale.to_int(obj))

    def loads(self, data: bytes | memoryview) -> Decimal:
        if len(data) != 8:
            raise CodecError(
                f"{self.name} cannot decode the {len(data)}-byte value: it needs 8 bytes",
                hint="the value was not written with this codec; check the table's codec",
            )
        return self.scale.to_decimal(_INT64.unpack(data)[0])

    def to_json(self, obj: Any) -> Any:
        return format(obj, "f") if isinstance(obj, Decimal) else str(obj)

    def __repr__(self) -> str:
        return f"<ScaledCodec {self.name}>"


_codecs: dict[int, Codec] = {}
_lock = threading.Lock()


def scaled_codec(decimals: int) -> Codec:
    """The value codec ``"scaled:<decimals>"``: amounts in, exact ``Decimal`` out.

    The first call registers it under that name, so a schema may also say
    ``value="scaled:8"`` once ``scaled_codec(8)`` has run (in every process that opens it).
    """
    with _lock:
        codec = _codecs.get(decimals)
        if codec is None:
            codec = ScaledCodec(decimals)
            try:
                register_codec(codec.name, codec)
            except SchemaError:  # registered by someone else under that name: use theirs
                codec = get_codec(codec.name)
            _codecs[decimals] = codec
        return codec
