"""The re-shard command's connection to the shard owners: read and record slot states
(``slot_state``), copy and drop rows (``move_rows``).

It is a client connection (``lmshard.connections.OwnerConnections``) with a client id of its
own: a ``move_rows`` batch resent after a lost reply has the same (client id, sequence number)
and is applied once. Recording a slot state again is harmless (the owner keeps the same state),
so ``slot_state`` goes without one.
"""

from __future__ import annotations

import time
from typing import Any

from lmshard.client_counters import ClientCounters
from lmshard.config import Config
from lmshard.connections import OwnerConnections
from lmshard.errors import Error, ShardUnavailable
from lmshard.protocol import MOVE_ROWS, SLOT_STATE
from lmshard.slot_state import SlotState

ADMIN_RETRIES = 3
"""Retries of one request after a timeout (same request, same sequence number)."""
OWNER_WAIT = 60.0
"""Seconds a request waits for an owner that is not running (restarting under supervisord,
or by hand) before the re-shard stops; a request to it is then sent anew, which is safe: a
slot state or a batch of moved rows applied twice leaves the same rows."""


class OwnerAdmin:
    """Admin requests to the owners of ``config`` (which names every shard involved)."""

    def __init__(self, config: Config, *, retries: int = ADMIN_RETRIES,
                 owner_wait: float = OWNER_WAIT) -> None:
        self.config = config
        self.owner_wait = owner_wait
        self.owners = OwnerConnections(config, ClientCounters(), timeout_ms=config.timeout_ms,
                                       retries=retries)

    def close(self) -> None:
        self.owners.close()

    def __enter__(self) -> OwnerAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, shard: int, code: int, body: Any, *, write: bool) -> Any:
        deadline = time.monotonic() + self.owner_wait
        while True:
            try:
                reply = self.owners.request(shard, code, body, write=write)
            except ShardUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            if isinstance(reply, Error):
                raise reply
            return reply

    def state(self, shard: int) -> tuple[SlotState, int]:
        """Shard ``shard``'s slot state and its last txn id."""
        reply = self._call(shard, SLOT_STATE.code, SLOT_STATE.build(None), write=False)
        return SlotState.from_wire(reply["state"]), int(reply["txn"])

    def states(self, shards: range) -> dict[int, SlotState]:
        """Every shard's slot state; ShardUnavailable naming the first that does not answer."""
        out = {}
        for n in shards:
            try:
                out[n] = self.state(n)[0]
            except ShardUnavailable as exc:
                raise ShardUnavailable(
                    f"shard {n}'s owner does not answer: {exc.message}",
                    hint="a re-shard needs every owner running: `lmshard status` shows them, "
                    "`lmshard up` starts them") from None
        return out

    def record(self, shard: int, state: SlotState) -> int:
        """Record ``state`` in shard ``shard``; the txn id the record committed as (or the
        shard's last txn id if it held that state already)."""
        reply = self._call(shard, SLOT_STATE.code, SLOT_STATE.build(state.to_wire()),
                           write=False)
        return int(reply["txn"])

    def move_rows(self, shard: int, ops: list[list[Any]]) -> int:
        """Apply ``ops`` (puts and deletes of stored rows) on shard ``shard``; its txn id."""
        reply = self._call(shard, MOVE_ROWS.code, MOVE_ROWS.build(ops), write=True)
        return int(reply[0])
