"""How a bad config value is described in a ConfigError (declared with every other error in
``lmshard.errors``).

Every message names the file and the dotted key (``durability.sync``), what was got and what
is expected: ``/etc/lmshard.toml: shards: got 0; expected an integer from 1 to 256``.
"""

from __future__ import annotations

from typing import Any

from lmshard.errors import ConfigError

__all__ = ["ConfigError", "describe"]


def describe(value: Any) -> str:
    """A value as a config file reader thinks of it: ``a string ('4')``, ``a table``."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} ({value!r})"
