"""What a client did in this process: batches and ops sent, retries, timeouts, remote reads.

``retries`` counts requests sent again after a timeout; ``unix_fallbacks`` those sent again at
once over ZeroMQ because the unix connection they went on broke (the owner stopped, was killed
or restarted); the owner applies a request once either way.

Each thread adds to its own dict (``d[k] += 1`` from two threads at once can lose a count);
``total()`` adds them up, and folds the dicts of finished threads into one.
"""

from __future__ import annotations

import threading
import weakref


class ClientCounters:
    """The client's counters, one dict per thread; ``mine()`` to add, ``total()`` to read."""

    NAMES = ("batches_sent", "ops_sent", "retries", "timeouts", "remote_reads", "batches_failed",
             "unavailable", "deadlines", "unix_fallbacks")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start from zero with a lock of its own (a child after fork counts its own work)."""
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._live: list[tuple[weakref.ref[threading.Thread], dict[str, int]]] = []
        self._done: dict[str, int] = dict.fromkeys(self.NAMES, 0)

    def mine(self) -> dict[str, int]:
        """This thread's counters, to add to."""
        d: dict[str, int] | None = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = dict.fromkeys(self.NAMES, 0)
            with self._lock:
                self._fold()
                self._live.append((weakref.ref(threading.current_thread()), d))
        return d

    def _fold(self) -> None:
        keep = []
        for ref, d in self._live:
            thread = ref()
            if thread is None or not thread.is_alive():
                for k, v in d.items():
                    self._done[k] += v
            else:
                keep.append((ref, d))
        self._live = keep

    def total(self) -> dict[str, int]:
        """Every counter summed over the threads."""
        with self._lock:
            self._fold()
            out = dict(self._done)
            for _, d in self._live:
                for k, v in d.items():
                    out[k] += v
        return out
