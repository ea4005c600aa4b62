"""Until ``lmshard.cli`` imports ``lmshard.ops.backup_cli`` itself: the name its command list
still gives the backup commands. Delete this file when cli.py is rewired."""

from __future__ import annotations

from lmshard.ops.backup_cli import add_parsers

__all__ = ["add_parsers"]
