"""What a shard owner keeps about itself beside its store: its counters, and whether its
filesystem is full (from the first commit refused for a full disk to the next that succeeds)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from lmshard.errors import DiskFull
from lmshard.map_growth import disk_full

log = logging.getLogger("lmshardd.owner")

DISK_FULL_LOG_INTERVAL = 60.0
"""Seconds between the log lines saying a shard still refuses writes for a full disk."""


@dataclass
class OwnerCounters:
    """What the owner has done since it started (published by the monitoring channel)."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    failed_batches: int = 0
    duplicate_batches: int = 0
    out_of_order: int = 0
    ops: int = 0
    commits: int = 0
    reads: int = 0
    bad_frames: int = 0
    last_txn_id: int = 0
    last_commit_time: float = 0.0
    flushes: int = 0
    """Flushes to disk by ``durability.flush_interval`` (``lmshardd.flushing``)."""
    last_flush_time: float = 0.0
    """Unix time of the last of them; 0 if none."""
    stale_reads: int = 0
    """Read commands whose first snapshot did not see the last commit (begun again)."""
    expired_rows: int = 0
    """Rows of tables with ttl deleted by the sweep (``lmshardd.expiry``)."""
    expiry_cpu_seconds: float = 0.0
    """CPU time of the owner's thread spent in those sweeps."""
    commit_seconds: list[float] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, list)}
        d["uptime"] = time.time() - self.started
        return d


@dataclass
class DiskFullSpell:
    """A time the shard's filesystem was full: from the first commit it refused to the next
    commit that succeeds (the owner tries each group again; nothing else waits for room)."""

    error: DiskFull
    since: float
    refused: int = 0
    logged: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since, "refused": self.refused, "error": self.error.message}


class DiskFullWatch:
    """Whether shard ``shard`` (at ``path``) is in a full-disk spell, logged when it begins,
    every DISK_FULL_LOG_INTERVAL while it lasts, and when it ends."""

    def __init__(self, path: str, shard: int) -> None:
        self.path, self.shard = path, shard
        self.spell: DiskFullSpell | None = None

    def refused(self, exc: lmdb.Error, batches: int) -> DiskFull | None:
        """The DiskFull to answer a group with if ``exc`` means a full disk, else None."""
        full = disk_full(exc, self.path, f"shard {self.shard}")
        if full is None:
            return None
        now = time.time()
        spell = self.spell = self.spell or DiskFullSpell(full, now)
        spell.error = full
        spell.refused += batches
        if now - spell.logged >= DISK_FULL_LOG_INTERVAL:
            if spell.logged:
                log.error("%s (still: %d batches refused in %.0f s)", full.message,
                          spell.refused, now - spell.since)
            else:
                log.error("%s", full.message)
            spell.logged = now
        return full

    def ended(self) -> None:
        """A commit succeeded: any spell is over."""
        if self.spell is not None:
            spell, self.spell = self.spell, None
            log.warning("shard %d takes writes again: its filesystem has room (refused %d "
                        "batches for a full disk over %.1f s)", self.shard, spell.refused,
                        time.time() - spell.since)

    def as_dict(self) -> dict[str, Any] | None:
        return None if self.spell is None else self.spell.as_dict()
