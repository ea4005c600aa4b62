"""``AsyncClient.writer()``: the pipelined bulk writer (``lmshard.writer``) for coroutines.

The streams, batches, ordering (``write_after``), resends and failures are the sync writer's own
(``WriterStreams``); this writer only waits differently: ``await w.put(...)`` returns at once
while the shard's buffer has room and the window of batches in flight is open, and waits for
acknowledgements when it is full (back-pressure), without blocking the event loop.
"""

from __future__ import annotations

from typing import Any

from lmshard.aio_owners import readable
from lmshard.protocol import OP_DELETE, OP_INCR, OP_PUT, incr_delta
from lmshard.txn import TableRef
from lmshard.writer import WriterStreams, _Stream


class AsyncWriter(WriterStreams):
    """Buffered, pipelined writes through an ``AsyncClient``; use it from one task at a time.

    ``async with client.writer() as w: await w.put(...)``; the end of the block flushes (waits
    for every acknowledgement) and raises ``BatchesFailed`` for refused batches, as the sync
    ``Writer`` does.
    """

    async def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None
                  ) -> None:
        ct = self._tables[table]
        st = self._buffered(ct, key, OP_PUT, ct.encode(value, ttl))
        if st is not None:
            await self._send(st)

    async def delete(self, table: TableRef, key: Any) -> None:
        st = self._buffered(self._tables[table], key, OP_DELETE, None)
        if st is not None:
            await self._send(st)

    async def incr(self, table: TableRef, key: Any, delta: int = 1) -> None:
        st = self._buffered(self._tables[table], key, OP_INCR, incr_delta(delta))
        if st is not None:
            await self._send(st)

    async def flush(self) -> None:
        """Send every buffered op and wait until every batch in flight is acknowledged;
        BatchesFailed if a shard refused any batch since the last call that raised."""
        while True:
            for st in list(self._streams.values()):
                while st.buf:
                    await self._send(st)
            if not self._rerouting and not self._active():
                break
            await self._pump()  # (ops routed again land in the buffers: sent on the next round)
        self._raise_failed()

    async def __aenter__(self) -> AsyncWriter:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            self.close()

    async def _send(self, st: _Stream) -> None:
        self._raise_failed()
        while self._rerouting or len(st.inflight) >= self.window:
            await self._pump()
            self._raise_failed()
        if st.buf:  # (routing again may have moved its ops to other streams)
            self._launch(st)

    async def _pump(self) -> None:
        """Wait for replies (up to the earliest deadline); handle them and any timeout."""
        active = self._active()
        if not active:
            self._reroute()
            return
        await readable([st.sock for st in active], self._wait_ms(active) / 1000)
        for st in active:
            self._receive(st)
        self._expire(active)
