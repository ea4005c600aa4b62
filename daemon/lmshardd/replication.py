"""Replicas as the shard owner sees them: how far each has applied the change log, and the write
acks that wait for them.

A replica follows the log on the change-feed channel (REPLICATE) and says what it has applied,
durably, with APPLIED(txn) (``lmshardd.changes`` passes both on here). ``Replication`` keeps,
per replica name, the highest transaction applied and when it said so, and the commit times of
recent transactions (a bounded deque), which give each replica's lag in seconds.

With ``durability.replicas = k`` (k >= 1) the owner does not send a successful write reply when
it commits: ``answer`` holds it until k distinct replicas have applied the batch's transaction,
then sends it on the owner's request socket. A reply held past ``durability.replica_timeout``
is answered ``ReplicaTimeout`` instead (the commit stays; the same batch sent again is answered
from its kept record and waits again). Nothing here blocks: held replies are released when an
APPLIED arrives (``applied``) and timed out between turns of the owner's loop (``tick``).
With k = 0 the owner sends its replies itself and never calls ``answer`` or ``tick``.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmshard import protocol
from lmshard.errors import Error, NotPrimary, ReplicaTimeout

COMMIT_TIMES = 4096
"""Recent commits whose time is kept for the replicas' lag in seconds; a replica further
behind is measured from the change log's record instead."""

Send = Callable[[Any, bytes], None]
"""Sends a released reply frame to its peer (a ROUTER identity or a unix-socket client)."""


@dataclass
class ReplicaProgress:
    """One replica, by name: the highest transaction it applied and when it last spoke."""

    name: str
    applied: int
    heard: float
    """Unix time of its last REPLICATE or APPLIED."""
    ident: bytes = b""
    wid: int = 0
    """Its follow on the change-feed channel (peer identity, watch id)."""


@dataclass(slots=True)
class HeldReply:
    """A successful write reply waiting for replicas."""

    ident: Any
    """Its peer (``lmshardd.owner.Peer``)."""
    seq: int
    txn: int
    frame: bytes
    deadline: float
    """Monotonic time at which it is answered ReplicaTimeout instead."""


class Replication:
    """Replica progress, commit times and held acks of one shard owner (see the module doc)."""

    def __init__(self, shard: int, required: int, timeout: float, send: Send) -> None:
        self.shard = shard
        self.required = required
        self.timeout = timeout
        self.send = send
        self.progress: dict[str, ReplicaProgress] = {}
        self.confirmed = 0
        """The highest transaction at least ``required`` replicas have applied."""
        self.held: deque[HeldReply] = deque()
        self._held_in_order = True  # held by ascending txn (a replay may break it)
        self.timeouts = 0
        """Replies answered ReplicaTimeout since the owner started."""
        self.released = 0
        self._txns: deque[int] = deque(maxlen=COMMIT_TIMES)
        self._times: deque[float] = deque(maxlen=COMMIT_TIMES)

    # -- what the change-feed channel tells ---------------------------------------------------

    def follow(self, name: str, ident: bytes, wid: int, applied: int) -> None:
        """Replica ``name`` follows the log again (REPLICATE) from ``applied + 1``: its entry
        is replaced (a replica that reconnects, or was replaced by a new copy)."""
        self.progress[name] = ReplicaProgress(name, applied, time.time(), ident, wid)
        self._release()

    def applied(self, name: str, txn: int) -> None:
        """Replica ``name`` has applied every transaction up to ``txn`` (APPLIED)."""
        p = self.progress.get(name)
        if p is None:
            return
        p.heard = time.time()
        if txn > p.applied:
            p.applied = txn
            self._release()

    def confirmed_by(self, txn: int) -> int:
        """How many replicas have applied ``txn``."""
        return sum(1 for p in self.progress.values() if p.applied >= txn)

    # -- held acks --------------------------------------------------------------------------

    def answer(self, replies: list[tuple[Any, bytes, int]], seqs: list[int],
               now: float) -> None:
        """Send each reply whose transaction (0: not a held kind, an error) enough replicas
        have applied; hold the others."""
        send, confirmed = self.send, self.confirmed
        deadline = now + self.timeout
        for (ident, frame, txn), seq in zip(replies, seqs, strict=True):
            if txn <= confirmed:
                send(ident, frame)
                continue
            if self.held and txn < self.held[-1].txn:
                self._held_in_order = False
            self.held.append(HeldReply(ident, seq, txn, frame, deadline))

    def tick(self, now: float) -> None:
        """Answer ReplicaTimeout to every held reply past its deadline."""
        held = self.held
        while held and held[0].deadline <= now:
            h = held.popleft()
            self.timeouts += 1
            m = self.confirmed_by(h.txn)
            self.send(h.ident, protocol.pack_error(h.seq, ReplicaTimeout(
                f"the batch was committed on shard {self.shard}'s owner in transaction {h.txn}, "
                f"but only {m} of the {self.required} replicas it waits for "
                f"(durability.replicas) confirmed it within {self.timeout:g} s; resending the "
                "same batch applies nothing again and waits for them again")))
        if not held:
            self._held_in_order = True

    def refuse_held(self, err: Error) -> None:
        """Answer every held reply with ``err`` (the owner stops being primary)."""
        while self.held:
            h = self.held.popleft()
            self.send(h.ident, protocol.pack_error(h.seq, err))
        self._held_in_order = True

    def _release(self) -> None:
        """Send the held replies the replicas now confirm."""
        if self.required <= 0:
            return
        applied = sorted((p.applied for p in self.progress.values()), reverse=True)
        if len(applied) < self.required:
            return
        confirmed = applied[self.required - 1]
        if confirmed <= self.confirmed:
            return
        self.confirmed = confirmed
        held, send = self.held, self.send
        while held and held[0].txn <= confirmed:
            h = held.popleft()
            send(h.ident, h.frame)
            self.released += 1
        if not self._held_in_order and held:
            keep: deque[HeldReply] = deque()
            for h in held:
                if h.txn <= confirmed:
                    send(h.ident, h.frame)
                    self.released += 1
                else:
                    keep.append(h)
            self.held = keep
        if not self.held:
            self._held_in_order = True

    # -- lag ------------------------------------------------------------------------------------

    def committed(self, txn: int, when: float) -> None:
        """Transaction ``txn`` was committed at unix time ``when``."""
        self._txns.append(txn)
        self._times.append(when)

    def commit_time_after(self, applied: int) -> float | None:
        """The commit time of the first transaction after ``applied`` this keeps; None when it
        does not reach back that far (or keeps none after it)."""
        txns = self._txns
        if not txns or txns[0] > applied + 1 or txns[-1] <= applied:
            return None
        return self._times[bisect.bisect_right(txns, applied)]

    def replicas(self, last_txn: int, oldest_unapplied: Callable[[int], float | None]
                 ) -> dict[str, dict[str, Any]]:
        """Each replica's ``{applied, lag_txns, lag_seconds, last_heard}``: transactions
        committed and not applied, how long the oldest of them has waited (0 when caught up),
        and the unix time it last spoke. ``oldest_unapplied(applied)`` gives that commit time
        when the deque does not (from the change log)."""
        now = time.time()
        out = {}
        for name, p in sorted(self.progress.items()):
            lag_txns = max(0, last_txn - p.applied)
            lag_s = 0.0
            if lag_txns:
                since = self.commit_time_after(p.applied)
                if since is None:
                    since = oldest_unapplied(p.applied)
                lag_s = max(0.0, now - since) if since is not None else 0.0
            out[name] = {"applied": p.applied, "lag_txns": lag_txns,
                         "lag_seconds": round(lag_s, 3), "last_heard": p.heard}
        return out

    def summary(self, last_txn: int, oldest_unapplied: Callable[[int], float | None]
                ) -> dict[str, Any]:
        """What stats and ``/metrics`` show: acks required, held, timed out, and per replica
        ``replicas()``."""
        return {"required": self.required, "timeout": self.timeout, "held": len(self.held),
                "timeouts": self.timeouts, "confirmed": self.confirmed,
                "replicas": self.replicas(last_txn, oldest_unapplied)}


def not_primary(shard: int, epoch: int, seen: int) -> NotPrimary:
    """The answer of an owner at ``epoch`` that a request at epoch ``seen`` has fenced."""
    return NotPrimary(
        f"shard {shard}'s owner here is at epoch {epoch}, but this request comes from epoch "
        f"{seen}: the shard was failed over to another copy, and this one no longer accepts "
        "writes", primary=None, epoch=epoch)
