"""Byte sizes as a config file writes them: ``4096``, ``"64MiB"``, ``"10 MB"``, ``"1.5KiB"``.

``parse_size`` reads them, ``format_size`` writes an exact size back (the inverse, unlike
``lmshard.units.format_bytes``, which rounds for people to read).
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Any

from lmshard.config.errors import ConfigError, describe

PAGE_SIZE = mmap.PAGESIZE
"""LMDB map sizes are rounded *up* to a multiple of this (the OS page size)."""

_SIZE_RE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SIZE_EXPECTED = (
    'a size: bytes as an integer, or a string like "64MiB", "1GiB", "512KiB", "10MB" '
    "(units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)"
)
"""What a size may look like, as error messages say it."""


def parse_size(value: Any, *, key: str = "size", file: str | os.PathLike[str] | None = None) -> int:
    """Parse a byte size: an int, or a string like ``"64MiB"``, ``"10 mb"``, ``"4096"``.

    Units are case-insensitive; KB/MB/GB/TB are SI (1000), KiB/MiB/GiB/TiB are IEC (1024).
    A decimal number is allowed if the result is whole bytes (``"1.5KiB"`` = 1536).
    Raises ``ConfigError`` naming ``key`` and ``file``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"got {describe(value)}; expected {SIZE_EXPECTED}", key=key, file=file)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"got {value}; expected a size >= 0", key=key, file=file)
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ConfigError(f"cannot parse {value!r}; expected {SIZE_EXPECTED}", key=key, file=file)
    whole, fraction, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ConfigError(
            f"unknown unit {unit!r} in {value!r}; expected {SIZE_EXPECTED}", key=key, file=file
        )
    fraction = fraction or ""
    # "1.5KiB" is 15 * 1024 / 10 bytes: exact in integers, without importing decimal.
    scale: int = 10 ** len(fraction)
    amount, remainder = divmod(int(whole + fraction) * multiplier, scale)
    if remainder:
        raise ConfigError(
            f"{value!r} is not a whole number of bytes; expected {SIZE_EXPECTED}",
            key=key,
            file=file,
        )
    return amount


def format_size(n: int) -> str:
    """The shortest exact spelling: ``"64MiB"`` for 64 * 2**20, ``"12345"`` for 12345."""
    for unit, multiplier in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= multiplier and n % multiplier == 0:
            return f"{n // multiplier}{unit}"
    return str(n)


def round_up_to_pages(n: int) -> int:
    """``n`` rounded up to whole pages, as LMDB sizes its map."""
    return -(-n // PAGE_SIZE) * PAGE_SIZE
