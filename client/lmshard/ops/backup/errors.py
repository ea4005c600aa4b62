"""The error of backup, verify and restore.

It lives here until ``lmshard.errors`` gives it a wire code of its own; then this module goes and
every import names ``lmshard.errors.BackupError``.
"""

from __future__ import annotations

from lmshard.errors import Error


class BackupError(Error):
    """A backup, verify or restore could not be done; the message says which shard and why."""

    hint = "nothing was changed; fix the cause and run the command again"
