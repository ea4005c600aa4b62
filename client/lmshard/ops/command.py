"""What the ``lmshard`` commands have in common: their exit statuses, the ``-c`` option that
finds the config, and how they print a line.

Every command finds the config by ``-c``, then ``$LMSHARD_CONFIG``, then
``./config/lmshard.toml``; supervisord.conf is the file next to it.
"""

from __future__ import annotations

import argparse

from lmshard.config import ENV_VAR

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_FAILED = 1
"""The command failed (the message on stderr says why), or found a problem (status, verify)."""
EXIT_USAGE = 2
"""Bad usage or a bad config: nothing was started or changed."""
EXIT_NOT_RUNNING = 3
"""``lmshard status``: the service is not running."""
EXIT_COMPACTED = 4
"""``lmshard watch``: the cursor is older than what the change logs keep."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as a shell reports it)."""


def say(text: str) -> None:
    """Print a line to stdout at once: an operator (or a test) reads progress as it happens."""
    print(text, flush=True)


def config_option() -> argparse.ArgumentParser:
    """A parent parser with ``-c/--config``, for the commands that act on one service."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-c", "--config", help=f"lmshard config file (default: ${ENV_VAR}, then "
        "./config/lmshard.toml); supervisord.conf is the file next to it")
    return parent
