"""The copies of a shard: its home and its replicas, which of them owns it, and at what epoch.

A shard has one *home* copy (``data_dir/shard-NN``, served at the ``shard.*`` endpoints) and one
copy per name in ``replica.names``, kept on another host by ``lmshardd replica`` (a full LMDB
environment that follows the owner's change log). At any time one copy is the *primary*: the
one process that accepts writes for the shard. That is the home copy until an operator fails the
shard over (``lmshard failover``) to a replica, which then serves the shard at its own
endpoints.

Every copy records in its own meta database (``__lmshard__``) what it knows:

- ``member_role``: ``primary`` or ``replica``;
- ``member_epoch``: the shard's epoch as this copy knows it. It starts at 1 and goes up by one
  at every failover, so a copy that was primary at a lower epoch knows it was replaced;
- ``member_primary``: the name of the copy it believes is primary;
- on a replica, ``replica_history`` / ``replica_applied`` / ``replica_applied_epoch``: the
  primary's change-log history it follows, the primary's last transaction id it has applied,
  and the epoch that transaction id belongs to.

Acks carry ``(epoch, txn id)``; read-your-writes on a replica compares them with
``(replica_applied_epoch, replica_applied)`` read in the same read transaction that serves the
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOME = "home"
"""The name of the shard's own copy (``data_dir``, ``shard.*`` endpoints)."""

PRIMARY = "primary"
REPLICA = "replica"

META_ROLE = b"member_role"
META_EPOCH = b"member_epoch"
META_PRIMARY = b"member_primary"
META_REPLICA_HISTORY = b"replica_history"
META_REPLICA_APPLIED = b"replica_applied"
META_REPLICA_APPLIED_EPOCH = b"replica_applied_epoch"

FIRST_EPOCH = 1


@dataclass(frozen=True)
class Member:
    """One copy of one shard: where it lives and where it answers."""

    name: str
    """``HOME`` or a replica name."""
    shard: int
    dir: Path
    """Its LMDB environment directory."""
    endpoint: str
    """Its request endpoint (ROUTER): writes once it is primary, answers before."""
    stat_endpoint: str
    backup_endpoint: str
    changes_endpoint: str

    @property
    def is_home(self) -> bool:
        return self.name == HOME

    def endpoints(self) -> tuple[str, str, str, str]:
        """``(request, stat, backup, changes)``, the order of ``REPLICA_ROLES``."""
        return (self.endpoint, self.stat_endpoint, self.backup_endpoint, self.changes_endpoint)


@dataclass(frozen=True)
class MemberState:
    """What a copy's meta database says about it (``read_state``)."""

    role: str
    epoch: int
    primary: str
    replica_history: str = ""
    applied: int = 0
    applied_epoch: int = 0


def read_state(meta: dict[bytes, bytes] | Any, name: str) -> MemberState:
    """The state a copy named ``name`` records in ``meta`` (a mapping of its meta records, or
    anything with ``.get``). A copy with no records yet: the home copy is the primary at the
    first epoch, a replica a replica that has applied nothing."""
    role = _text(meta.get(META_ROLE))
    if not role:
        role = PRIMARY if name == HOME else REPLICA
    return MemberState(
        role=role,
        epoch=_int(meta.get(META_EPOCH)) or FIRST_EPOCH,
        primary=_text(meta.get(META_PRIMARY)) or HOME,
        replica_history=_text(meta.get(META_REPLICA_HISTORY)),
        applied=_int(meta.get(META_REPLICA_APPLIED)),
        applied_epoch=_int(meta.get(META_REPLICA_APPLIED_EPOCH)),
    )


def state_records(state: MemberState) -> dict[bytes, bytes]:
    """``state`` as the meta records ``read_state`` reads back."""
    return {
        META_ROLE: state.role.encode(),
        META_EPOCH: str(state.epoch).encode(),
        META_PRIMARY: state.primary.encode(),
        META_REPLICA_HISTORY: state.replica_history.encode(),
        META_REPLICA_APPLIED: str(state.applied).encode(),
        META_REPLICA_APPLIED_EPOCH: str(state.applied_epoch).encode(),
    }


def _text(v: Any) -> str:
    return bytes(v).decode() if v is not None else ""


def _int(v: Any) -> int:
    try:
        return int(bytes(v)) if v is not None else 0
    except ValueError:
        return 0
