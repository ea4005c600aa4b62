"""Asking the copies of a shard who owns it: PING every copy at once, pick the primary.

Every copy of a shard (``lmshard.members``) answers PING at its request endpoint with its
health, which carries ``member``, ``role``, ``epoch`` and ``primary`` (an owner from before
replicas answers without them: it is the primary at the first epoch). The copy that says it is
primary at the highest epoch is the primary; a copy that says primary at a lower epoch was
replaced by a failover it missed.

Clients ask when a shard's owner falls silent or answers NotPrimary without naming another
copy (``lmshard.connections``); a copy's process asks when it starts and when the copy it
follows falls silent (``lmshardd.membership``, ``lmshardd.replica``); operators' commands ask
to show and move copies (``lmshard copies``, ``lmshard failover``, ``lmshard status``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import zmq

from lmshard import security
from lmshard.config import Config
from lmshard.errors import Error
from lmshard.members import FIRST_EPOCH, PRIMARY, Member
from lmshard.protocol import PING, pack_request, unpack_frame

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
        epoch = self.health.get("epoch", FIRST_EPOCH)
        return epoch if type(epoch) is int else FIRST_EPOCH

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY


def owner_socket(ctx: zmq.Context[Any], config: Config, endpoint: str) -> zmq.Socket[bytes]:
    """A new DEALER socket connected to ``endpoint`` (a copy of a shard), secured as the config
    says (the sync and the async client's, and every PING of a copy)."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_client(sock, config, endpoint)
    sock.connect(endpoint)
    return sock


def ipc_missing(endpoint: str) -> bool:
    """Whether ``endpoint`` is an ipc endpoint whose socket file is not there (nothing serves
    it); False for tcp, and when the file cannot be looked at."""
    return endpoint.startswith("ipc:///") and file_missing(endpoint[len("ipc://"):])


def file_missing(path: str) -> bool:
    """Whether ``path`` is not there (False when it cannot be looked at)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # e.g. no permission to look: let the request find out
    return False


def ping_copies(config: Config, shard: int, names: list[str] | None = None,
                timeout: float = PING_TIMEOUT, ctx: zmq.Context[Any] | None = None
                ) -> dict[str, Answer]:
    """Every copy's (or each of ``names``') answer to PING, asked in parallel, in config order;
    a copy that does not answer within ``timeout`` seconds (or whose ipc socket file is
    missing: it is not running, and is not waited for) has ``health`` None and says why."""
    members = [m for m in config.members(shard) if names is None or m.name in names]
    out: dict[str, Answer] = {}
    socks = _send_pings(ctx or zmq.Context.instance(), config, members, out)
    try:
        _collect(socks, timeout, out)
    finally:
        for sock in socks:
            sock.close(linger=0)
    return {m.name: out[m.name] for m in members}


def _send_pings(ctx: zmq.Context[Any], config: Config, members: list[Member],
                out: dict[str, Answer]) -> dict[zmq.Socket[bytes], Member]:
    """A PING to each member on a new socket; those that cannot be asked go in ``out``."""
    socks: dict[zmq.Socket[bytes], Member] = {}
    code, body = PING.request_for()
    for m in members:
        if ipc_missing(m.endpoint):
            out[m.name] = Answer(m.name, m.endpoint, None, f"nothing serves {m.endpoint}")
            continue
        try:
            sock = owner_socket(ctx, config, m.endpoint)
        except Error as exc:
            out[m.name] = Answer(m.name, m.endpoint, None, exc.message)
            continue
        socks[sock] = m
        try:
            sock.send(pack_request(code, None, 1, body), zmq.NOBLOCK)
        except zmq.Again:
            pass
    return socks


def _collect(socks: dict[zmq.Socket[bytes], Member], timeout: float,
             out: dict[str, Answer]) -> None:
    """Each socket's answer, or for those silent past ``timeout``, why there is none."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    waiting = dict(socks)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for sock in dict(poller.poll(int(left * 1000) + 1)):
            m = waiting.pop(sock, None)
            if m is not None:
                poller.unregister(sock)
                out[m.name] = _answer(m.name, m.endpoint, sock.recv())
    for m in waiting.values():
        out[m.name] = Answer(m.name, m.endpoint, None,
                             f"no answer within {timeout:g} s at {m.endpoint}")


def _answer(name: str, endpoint: str, frame: bytes) -> Answer:
    try:
        _seq, status, body = unpack_frame(frame)
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


def highest_epoch(answers: dict[str, Answer]) -> int:
    """The highest epoch any copy reports (0 when none answered)."""
    return max((a.epoch for a in answers.values()), default=0)
