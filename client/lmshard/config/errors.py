"""ConfigError, the one error a config problem raises, and how a bad value is described in it.

Every message names the file and the dotted key (``durability.sync``), what was got and what
is expected: ``/etc/lmshard.toml: shards: got 0; expected an integer from 1 to 256``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmshard.errors import Error


class ConfigError(Error, ValueError):
    """The config file is missing, unreadable, not TOML, or has a bad key or value.

    ``key`` is the dotted key (``durability.sync``) or None; ``file`` the config file or None
    (config built by ``make_config``); ``line`` is set for TOML syntax errors; ``detail`` is the
    message without the file and key prefix.
    """

    code = 50
    hint = ""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        file: str | os.PathLike[str] | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.file = Path(file) if file is not None else None
        self.line = line
        self.detail = message
        prefix = ""
        if file is not None:
            prefix = f"{file}:{line}: " if line is not None else f"{file}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, hint=hint)


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
