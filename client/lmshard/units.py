"""How lmshard shows sizes to people: one formatter for the CLI, ``top``, backups and logs."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``, ``64 * 2**20`` -> ``"64.0 MiB"``, ``512`` -> ``"512 B"``;
    powers of 1024; ``"-"`` for None (a value not known)."""
    if n is None:
        return "-"
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
