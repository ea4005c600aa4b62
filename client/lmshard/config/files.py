"""Which config file is used, and reading it: ``find_config`` and ``load_config``.

The file is the ``path`` argument (the CLI's ``--config``), else ``$LMSHARD_CONFIG``, else
``config/lmshard.toml`` under the current directory; there is no silent fallback to defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from lmshard.config.errors import ConfigError
from lmshard.config.model import Config, build_config

ENV_VAR = "LMSHARD_CONFIG"
"""Environment variable naming the config file (used when no path is passed)."""
DEFAULT_CONFIG = Path("config") / "lmshard.toml"
"""Default config file, relative to the current directory."""


def find_config(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the config file to use: ``path`` > ``$LMSHARD_CONFIG`` > ``./config/lmshard.toml``.

    The result is absolute (symlinks not resolved). Raises ``ConfigError`` if the chosen file
    does not exist, saying where the name came from.
    """
    env = os.environ.get(ENV_VAR, "")
    if path is not None and os.fspath(path) != "":
        candidate, source = Path(path), "the path argument (--config)"
    elif env:
        candidate, source = Path(env), f"the environment variable {ENV_VAR}"
    else:
        candidate, source = DEFAULT_CONFIG, "the default location"
    candidate = candidate.expanduser().absolute()
    if candidate.is_file():
        return candidate
    if candidate.exists():
        raise ConfigError(
            f"config file {candidate} (from {source}) is not a regular file", file=candidate
        )
    if source == "the default location":
        raise ConfigError(
            f"no config file: none passed, {ENV_VAR} not set, and {candidate} does not exist",
            hint=f"pass --config PATH, set {ENV_VAR}, or run from the directory holding "
            "config/lmshard.toml",
        )
    raise ConfigError(f"config file {candidate} (from {source}) does not exist", file=candidate)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Find (see ``find_config``), read, parse and validate the config file. Relative paths
    in it are relative to the directory that holds it."""
    file = find_config(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 at byte {exc.start}; TOML files are UTF-8", file=file
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib gives the position only in its message ("... (at line 2, column 9)").
        match = re.search(r"at line (\d+), column (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError(
            f"invalid TOML: {exc}", file=file, line=line, hint="fix the TOML syntax"
        ) from exc
    return build_config(raw, file=file, base_dir=file.parent)
