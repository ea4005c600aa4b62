"""How backup, verify and restore show progress: one plain line per shard and interval.

The library reports through ``Progress`` only; the CLI prints it on stderr, a program can
subclass it to report elsewhere, or pass nothing to stay silent (``QUIET``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO

from lmshard.units import format_bytes

REPORT_INTERVAL = 1.0
"""Seconds between two progress lines of one shard."""


@dataclass
class _ShardProgress:
    total: int | None
    estimated: bool
    started: float  # monotonic
    last_line: float  # monotonic
    done: int = 0


class Progress:
    """Per-shard progress as plain lines on a text stream (stderr by default).

    Each line shows bytes done of the total, the rate and the time left; a shard prints at most
    one line per ``interval`` seconds, and one when it finishes or fails. Subclass it (or pass
    ``quiet=True``) to report elsewhere; the library calls only these methods.
    """

    def __init__(self, verb: str, stream: IO[str] | None = None, *,
                 interval: float = REPORT_INTERVAL, quiet: bool = False) -> None:
        self.verb = verb
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.quiet = quiet
        self._shards: dict[int, _ShardProgress] = {}

    def begin(self, shard: int, total: int | None, *, estimated: bool = False) -> None:
        """``shard`` starts; ``total`` bytes are expected (an estimate if ``estimated``)."""
        now = time.monotonic()
        self._shards[shard] = _ShardProgress(total, estimated, now, now)

    def advance(self, shard: int, nbytes: int) -> None:
        """``nbytes`` more of ``shard`` are done; prints a line once per interval."""
        if self.quiet:
            return
        s = self._shards[shard]
        s.done += nbytes
        now = time.monotonic()
        if now - s.last_line >= self.interval:
            s.last_line = now
            self._line(shard, "")

    def done(self, shard: int) -> None:
        """``shard`` finished."""
        self._line(shard, "done")

    def failed(self, shard: int, why: str) -> None:
        """``shard`` failed (said only for a shard that began)."""
        if shard in self._shards:
            self._line(shard, f"FAILED: {why}")

    def note(self, text: str) -> None:
        """A line about the whole run."""
        if not self.quiet:
            print(f"{self.verb}: {text}", file=self.stream, flush=True)

    def _line(self, shard: int, status: str) -> None:
        if self.quiet:
            return
        s = self._shards[shard]
        total, done = s.total, s.done
        seconds = max(time.monotonic() - s.started, 1e-6)
        rate = done / seconds
        text = f"{self.verb} shard {shard:02d}  {format_bytes(done)}"
        if total:
            shown = max(total, done)
            text += f" / {'~' if s.estimated else ''}{format_bytes(shown)}"
            text += f"  {min(100.0, 100.0 * done / shown):5.1f}%"
        text += f"  {format_bytes(rate)}/s"
        if status:
            text += f"  {seconds:.1f}s  {status}"
        elif total and rate > 0:
            text += f"  ETA {max(0.0, (total - done) / rate):.0f}s"
        print(text, file=self.stream, flush=True)


QUIET = Progress("", quiet=True)
"""Reports nothing: what the library uses when given no Progress."""
