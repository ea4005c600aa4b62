"""Whether a copy's process serves its shard (owner) or follows another copy (replica): what
its own meta database says, checked against what the other copies answer to PING
(``lmshard.copies``) when the process starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lmshard.config import Config
from lmshard.copies import PING_TIMEOUT, ping_copies, primary_of
from lmshard.members import HOME, PRIMARY, REPLICA, MemberState, read_state
from lmshard.store_meta import read_meta

log = logging.getLogger("lmshardd.membership")

def read_member_state(path: Path, name: str) -> tuple[MemberState, bool]:
    """What copy ``name``'s environment at ``path`` records about its role (``read_state``),
    and whether the environment exists (the defaults when it does not)."""
    meta = read_meta(path)
    return read_state(meta or {}, name), meta is not None


@dataclass(frozen=True)
class StartDecision:
    """How a copy's process runs: as the shard's owner, or as a replica of ``state.primary``."""

    owner: bool
    state: MemberState
    """The state to run with (and to record, when it differs from the copy's meta)."""
    changed: bool
    reason: str


def decide_start(config: Config, shard: int, name: str, *,
                 timeout: float = PING_TIMEOUT) -> StartDecision:
    """At the start of copy ``name``'s process: read its meta; with replicas configured, ask
    the other copies. A copy that another copy outranks (primary at a higher epoch) becomes
    its replica; a copy whose meta says primary serves as owner; any other follows the copy
    its meta names, or the primary the others name when that copy is not primary."""
    member = config.member(shard, name)
    state, _exists = read_member_state(member.dir, member.name)
    if not config.replica_names:
        return StartDecision(state.role == PRIMARY, state, False, "no replicas configured")
    others = [m.name for m in config.members(shard) if m.name != member.name]
    answers = ping_copies(config, shard, others, timeout)
    top = primary_of(answers)
    if top is not None and top.epoch > state.epoch:
        new = replace(state, role=REPLICA, primary=top.member, epoch=top.epoch)
        return StartDecision(False, new, new != state,
                             f"{top.member} is primary at epoch {top.epoch}, above this "
                             f"copy's {state.epoch}")
    if state.role == PRIMARY:
        if top is not None and top.epoch == state.epoch:
            log.warning("shard %d: %s also says it is primary at epoch %d; this copy serves "
                        "as its meta says", shard, top.member, top.epoch)
        return StartDecision(True, state, False, f"its meta says primary at epoch "
                                                 f"{state.epoch}")
    named = answers.get(state.primary)
    if (named is None or not named.is_primary) and top is not None \
            and top.member != state.primary:
        new = replace(state, primary=top.member, epoch=max(state.epoch, top.epoch))
        return StartDecision(False, new, True, f"{state.primary} is not primary; "
                                               f"{top.member} is, at epoch {top.epoch}")
    return StartDecision(False, state, False, f"replica of {state.primary}")


__all__ = ["HOME", "StartDecision", "decide_start", "read_member_state"]
