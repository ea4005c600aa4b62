"""Which copy of a shard is primary: ask every copy (PING), and decide at a process's start
whether this copy serves the shard (owner) or follows another (replica).

Every copy answers PING at its request endpoint with its health, which carries ``member``,
``role``, ``epoch`` and ``primary`` (an owner from before replicas answers without them: it is
the primary at the first epoch). The copy that says it is primary at the highest epoch is the
primary; a copy that says primary at a lower epoch was replaced by a failover it missed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import zmq

from lmshard import protocol, security
from lmshard.config import Config
from lmshard.errors import Error
from lmshard.members import FIRST_EPOCH, HOME, PRIMARY, REPLICA, MemberState, read_state
from lmshard.store_meta import MAX_DBS, META_DB

log = logging.getLogger("lmshardd.membership")

PING_TIMEOUT = 0.5
"""Seconds a copy has to answer the PING that asks it for its role."""


@dataclass(frozen=True)
class Answer:
    """One copy's answer to PING: its health, or why there is none."""

    member: str
    endpoint: str
    health: dict[str, Any] | None
    error: str | None = None

    @property
    def role(self) -> str | None:
        if self.health is None:
            return None
        return str(self.health.get("role", PRIMARY))

    @property
    def epoch(self) -> int:
        if self.health is None:
            return 0
        return int(self.health.get("epoch", FIRST_EPOCH))

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY


def ping_members(config: Config, shard: int, names: list[str] | None = None,
                 timeout: float = PING_TIMEOUT) -> dict[str, Answer]:
    """Every copy's (or each of ``names``') answer to PING, asked in parallel; a copy that
    does not answer within ``timeout`` seconds has ``health`` None."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    members = [m for m in config.members(shard) if names is None or m.name in names]
    socks: dict[zmq.Socket[bytes], Any] = {}
    out: dict[str, Answer] = {}
    poller = zmq.Poller()
    try:
        for m in members:
            sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                security.secure_client(sock, config, m.endpoint)
            except Error as exc:
                sock.close(linger=0)
                out[m.name] = Answer(m.name, m.endpoint, None, exc.message)
                continue
            sock.connect(m.endpoint)
            sock.send(protocol.pack_request(protocol.PING.code, None, 1, None))
            socks[sock] = m
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = dict(socks)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock in dict(poller.poll(int(left * 1000) + 1)):
                m = waiting.pop(sock, None)
                if m is None:
                    continue
                poller.unregister(sock)
                out[m.name] = _answer(m.name, m.endpoint, sock.recv())
        for m in waiting.values():
            out[m.name] = Answer(m.name, m.endpoint, None,
                                 f"no answer within {timeout:g} s at {m.endpoint}")
    finally:
        for sock in socks:
            sock.close(linger=0)
    return {m.name: out[m.name] for m in members}


def _answer(name: str, endpoint: str, frame: bytes) -> Answer:
    try:
        _seq, status, body = protocol.unpack_frame(frame)
    except (Error, ValueError) as exc:
        return Answer(name, endpoint, None, f"bad answer: {exc}")
    if status != 0 or not isinstance(body, dict):
        message = body[0] if isinstance(body, list) and body else body
        return Answer(name, endpoint, None, f"answered error {status}: {message}")
    return Answer(name, endpoint, body)


def primary_of(answers: dict[str, Answer], exclude: str | None = None) -> Answer | None:
    """The answer of the copy that says it is primary at the highest epoch (None if none
    does), leaving out ``exclude``."""
    best: Answer | None = None
    for a in answers.values():
        if a.member != exclude and a.is_primary and (best is None or a.epoch > best.epoch):
            best = a
    return best


def read_member_state(path: Path, name: str) -> tuple[MemberState, bool]:
    """What copy ``name``'s environment at ``path`` records about its role (``read_state``),
    and whether the environment exists (the defaults when it does not)."""
    if not (path / "data.mdb").exists():
        return read_state({}, name), False
    env = lmdb.open(str(path), readonly=True, max_dbs=MAX_DBS, lock=True)
    try:
        with env.begin() as txn:
            try:
                db = env.open_db(META_DB, txn=txn, create=False)
            except lmdb.NotFoundError:
                return read_state({}, name), True
            meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=db).iternext()}
    finally:
        env.close()
    return read_state(meta, name), True


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
    answers = ping_members(config, shard, others, timeout)
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


__all__ = ["Answer", "HOME", "PING_TIMEOUT", "StartDecision", "decide_start", "ping_members",
           "primary_of", "read_member_state"]
