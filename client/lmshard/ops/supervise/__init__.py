"""Running lmshard under supervisord: one supervisord per lmshard config.

- ``conf``: the generated ``supervisord.conf`` (next to ``lmshard.toml``), rendered from the
  template in ``lmshard/ops/templates/``, and where it puts supervisord's socket, pid file and
  logs.
- ``rpc``: talking to a running supervisord through its XML-RPC interface on that socket: what
  runs, and waiting until every shard owner answers.
- ``control``: starting and stopping supervisord, and cleaning up after processes that died.

``lmshard.ops.service_cli`` and ``lmshard.ops.status`` print the results.
"""

from __future__ import annotations


class SupervisorError(RuntimeError):
    """supervisord could not be started, reached or stopped, or a process did not come up.

    Not an ``lmshard.errors.Error``: those are the wire protocol's error table, and this one
    never crosses the wire. Same shape: ``message``, ``hint``.
    """

    hint = "see the log files named in the message; `lmshard status` shows what runs"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        super().__init__(f"{message} ({self.hint})" if self.hint else message)
