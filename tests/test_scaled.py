"""Scaled int64 amounts: exact Decimal round trips, documented float rounding, the codec."""

from __future__ import annotations

import decimal
import json
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lmshard
from lmshard.scaled import INT64_MAX, INT64_MIN, Scaled, ScaledCodec, ScaleError, scaled_codec

PRICES_ID = "3f0c2a9e-8d41-4b6a-9c1e-5a7d2b4c6e08"

int64s = st.integers(INT64_MIN, INT64_MAX)
scales = st.integers(0, 18)


@given(scales, int64s)
def test_every_int64_round_trips_through_decimal_and_str(decimals: int, n: int) -> None:
    s = Scaled(decimals)
    d = s.to_decimal(n)
    assert d.as_tuple().exponent == -decimals  # always exactly `decimals` places
    assert s.to_int(d) == n
    assert s.to_int(str(d)) == n
    assert s.to_int(format(d, "f")) == n


@given(scales, int64s)
def test_decimals_within_the_scale_are_stored_exactly(decimals: int, n: int) -> None:
    # A Decimal written with fewer places (e.g. 1.5 at 8 decimals) still maps exactly.
    d = Decimal(n).scaleb(-decimals).normalize(decimal.Context(prec=40))
    s = Scaled(decimals)
    assert s.to_int(d) == n
    assert s.to_decimal(s.to_int(d)) == d


@given(scales, int64s)
def test_codec_round_trips_exactly(decimals: int, n: int) -> None:
    codec = scaled_codec(decimals)
    d = Scaled(decimals).to_decimal(n)
    data = codec.dumps(d)
    assert len(data) == 8
    back = codec.loads(data)
    assert back == d and str(back) == str(d)
    assert codec.loads(memoryview(data)) == d


def test_too_many_decimals_is_refused_unless_rounding_is_asked() -> None:
    s = Scaled(2)
    assert s.to_int("1.25") == 125
    assert s.to_int("1.250000") == 125  # trailing zeros are not extra precision
    with pytest.raises(ScaleError, match="more than 2 decimals"):
        s.to_int("1.255")
    with pytest.raises(ScaleError, match="more than 2 decimals"):
        s.to_int(Decimal("0.001"))
    assert s.to_int("1.255", rounding=decimal.ROUND_HALF_EVEN) == 126
    assert s.to_int("1.245", rounding=decimal.ROUND_HALF_EVEN) == 124
    assert s.to_int("1.245", rounding=decimal.ROUND_HALF_UP) == 125
    assert s.to_int("-1.255", rounding=decimal.ROUND_DOWN) == -125
    assert s.quantize("2.345") == Decimal("2.34")
    # 66 significant digits: the last one must not be lost to the decimal context's precision
    long = "1." + "0" * 64 + "1"
    with pytest.raises(ScaleError):
        Scaled(8).to_int(long)
    assert Scaled(8).to_int(long, rounding=decimal.ROUND_UP) == 100_000_001


def test_floats_are_read_as_their_shortest_repr_then_rounded_half_even() -> None:
    s8, s2 = Scaled(8), Scaled(2)
    assert s8.to_int(0.1) == 10_000_000  # not 10000000.000000000555...
    assert s8.to_int(0.1 + 0.2) == 30_000_000  # repr 0.30000000000000004 rounds to the scale
    assert s2.to_int(2.675) == 268  # repr "2.675" (the binary value is 2.67499999...)
    assert s2.to_int(0.125) == 12  # a tie goes to the even neighbour
    assert s2.to_int(0.375) == 38
    assert s2.to_int(-0.125) == -12
    assert s2.to_int(1e-9) == 0
    assert s8.to_float(s8.to_int(1234.5678)) == 1234.5678


def test_to_float_is_correctly_rounded() -> None:
    s = Scaled(8)
    n = 2**60 + 1  # beyond 2**53: a float cannot hold it, the nearest one is returned
    assert s.to_float(n) == float(Decimal(n).scaleb(-8))
    assert s.to_float(-1) == -1e-8


@pytest.mark.parametrize(
    "bad",
    ["92233720368.54775808", "-92233720368.54775809", "1e400", "nan", "inf", float("nan"),
     float("-inf"), True, None, [1], "one"],
)
def test_out_of_range_and_non_numbers_are_refused(bad: object) -> None:
    with pytest.raises(ScaleError):
        Scaled(8).to_int(bad)  # type: ignore[arg-type]


def test_limits_of_int64_are_accepted() -> None:
    s = Scaled(8)
    assert s.to_int("92233720368.54775807") == INT64_MAX
    assert s.to_int("-92233720368.54775808") == INT64_MIN
    assert Scaled(0).to_int(INT64_MAX) == INT64_MAX
    with pytest.raises(ScaleError):
        Scaled(1).to_int(INT64_MAX)


def test_bad_scale_is_a_schema_error() -> None:
    for bad in (-1, 19, 2.0, True):
        with pytest.raises(lmshard.SchemaError):
            Scaled(bad)  # type: ignore[arg-type]


def test_arrays() -> None:
    s = Scaled(4)
    floats = np.array([0.0001, 1.5, -2.25, 123.4567])
    ints = s.to_int_array(floats)
    assert ints.dtype == np.int64
    assert ints.tolist() == [1, 15000, -22500, 1234567]
    assert s.to_float_array(ints).tolist() == floats.tolist()
    assert s.to_int_array(np.array([1, -2], dtype=np.int32)).tolist() == [10000, -20000]
    exact = s.to_int_array(np.array([Decimal("0.0001"), "7.5"], dtype=object))
    assert exact.tolist() == [1, 75000]
    assert s.to_int_array(np.empty((0,))).shape == (0,)
    assert s.to_int_array(np.ones((2, 3))).shape == (2, 3)
    with pytest.raises(ScaleError):
        s.to_int_array(np.array([np.nan]))
    with pytest.raises(ScaleError):
        s.to_int_array(np.array([1e16]))
    with pytest.raises(ScaleError):
        s.to_int_array(np.array([2**62], dtype=np.int64))
    with pytest.raises(ScaleError):
        s.to_int_array(np.array(["0.00001"], dtype=object))


def test_codec_is_registered_and_stored_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    codec = scaled_codec(8)
    assert scaled_codec(8) is codec
    assert lmshard.get_codec("scaled:8") is codec
    assert isinstance(codec, ScaledCodec) and isinstance(codec, lmshard.Codec)
    schema = lmshard.Schema("prices")
    schema.table("prices", table_id=PRICES_ID, key="str", value=codec)
    amounts = {"btc": Decimal("67123.45678901"), "tiny": Decimal("0.00000001"), "neg": "-3.5"}
    with lmshard.open(tmp_path / "s", schema) as store:
        for k, v in amounts.items():
            store.put("prices", k, v)
        assert store.get("prices", "btc") == Decimal("67123.45678901")
        assert str(store.get("prices", "tiny")) == "1E-8"
        assert store.get("prices", "neg") == Decimal("-3.50000000")
        m = store.marshal("prices", "tiny")
        assert m is not None and m["value"] == "0.00000001" and m["size"] == 8
        json.dumps(m)
        with pytest.raises(lmshard.CodecError):
            store.put("prices", "bad", "0.000000001")
        assert store.get("prices", "bad") is None
    # A schema may name it once it is registered; the store records the name.
    by_name = lmshard.Schema("prices")
    by_name.table("prices", table_id=PRICES_ID, key="str", value="scaled:8")
    with lmshard.open(tmp_path / "s", by_name) as store:
        assert store.get("prices", "btc") == Decimal("67123.45678901")
    with pytest.raises(lmshard.CodecError, match="8 bytes"):
        codec.loads(b"\x00" * 7)
