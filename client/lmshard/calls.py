"""What the client's data-API calls mean, written once for both transports.

``lmshard.Client`` (blocking sockets) and ``lmshard.aio.AsyncClient`` (asyncio) differ only in
how a request reaches an owner and how they wait for the reply. Everything else lives here:
which shard a key goes to and the op that writes it, what a reply means, and for the reads that
span shards, the plan: what this process reads from its own maps at once, which requests go
over the wire, and how their replies are merged into the answer. (The way httpx's ``Client`` and
``AsyncClient`` share their models, and redis-py's sync and asyncio clients share command
mixins.)
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from lmshard.batch import PartOutcome
from lmshard.client_tables import ClientTable
from lmshard.errors import Error, UnknownIndex
from lmshard.keys import encode_index_value
from lmshard.protocol import COUNT, GET_MANY, LOOKUP, op
from lmshard.reads import LocalShards, Request
from lmshard.store import Store
from lmshard.txn import filtered_rows, index_prefix, key_bounds

GET_MANY_CHUNK = 10_000
"""Keys per remote get_many request; the chunks of one call are sent at once."""

RemoteParts = list[tuple[int, Request]]
"""Read requests for the wire: (shard, (command code, body)), answered in this order."""


# -- writes ------------------------------------------------------------------------------------


def one_op(ct: ClientTable, key: Any, code: int, arg: Any) -> tuple[int, list[list[Any]]]:
    """The shard of ``key`` and the ``write`` body of one op on it (a single put, delete, incr);
    bad keys raise here, before anything is sent."""
    kb = ct.kenc(key)
    return ct.shard(key, kb), [op(code, ct.tid, kb, arg)]


def op_result(reply: Any) -> Any:
    """The result of a one-op write from the owner's reply; the Error it answered raises."""
    if isinstance(reply, Error):
        raise reply
    return reply[1][0]


def part_outcomes(replies: dict[int, Any]) -> dict[int, PartOutcome]:
    """Each shard's write reply (a body or an Error) as the batch's part outcome."""
    return {s: (r, None) if isinstance(r, Error) else (None, r) for s, r in replies.items()}


# -- reads over several shards -----------------------------------------------------------------


class GetMany:
    """``get_many``: the keys of the shards mapped here read at once; the others as requests
    (``remote``) whose replies ``fill`` puts in place. ``out`` is the answer."""

    def __init__(self, local: LocalShards, ct: ClientTable, keys: Any, default: Any) -> None:
        self.ct = ct
        keys = list(keys)
        self.out: list[Any] = [default] * len(keys)
        by_shard: dict[int, list[tuple[int, bytes]]] = {}
        for i, key in enumerate(keys):
            kb = ct.kenc(key)
            by_shard.setdefault(ct.shard(key, kb), []).append((i, kb))
        self._wanted: list[list[tuple[int, bytes]]] = []
        self.remote: RemoteParts = []
        for shard, items in by_shard.items():
            st = local.get(shard)
            if st is None:
                for c in range(0, len(items), GET_MANY_CHUNK):
                    chunk = items[c:c + GET_MANY_CHUNK]
                    self._wanted.append(chunk)
                    self.remote.append(
                        (shard, GET_MANY.request_for(ct.tid, [kb for _, kb in chunk])))
                continue
            out, loads = self.out, ct.loads
            with st.read() as r:
                for i, kb in items:
                    data = r.get_raw(ct.table, kb)
                    if data is not None:
                        out[i] = loads(data)

    def fill(self, replies: list[Any]) -> list[Any]:
        """Put the replies to ``remote`` in place; the answer."""
        for items, datas in zip(self._wanted, replies, strict=True):
            for (i, _), data in zip(items, datas, strict=True):
                if data is not None:
                    self.out[i] = self.ct.loads(data)
        return self.out


class Count:
    """``count``: the shards mapped here counted at once, the others as requests."""

    def __init__(self, local: LocalShards, ct: ClientTable, prefix: Any, start: Any,
                 end: Any) -> None:
        lo, hi = key_bounds(ct, prefix, start, end)
        self.total = 0
        self.remote: RemoteParts = []
        for shard in ct.route.shards_for(prefix):
            st = local.get(shard)
            if st is None:
                self.remote.append((shard, COUNT.request_for(ct.tid, lo, hi)))
                continue
            with st.read() as r:
                self.total += r.count_raw(ct.table, lo, hi)

    def fill(self, replies: list[Any]) -> int:
        return self.total + sum(int(n) for n in replies)


class Lookup:
    """``lookup``: rows by index value from every shard the table lives on, in key order."""

    def __init__(self, local: LocalShards, ct: ClientTable, index: str, value: Any,
                 prefix: bool) -> None:
        if index not in ct.table.indexes:
            raise UnknownIndex(f"table {ct.name!r} has no index {index!r}",
                               hint=f"its indexes: {', '.join(ct.table.indexes) or '(none)'}")
        self.ct = ct
        self.rows: list[tuple[bytes, bytes]] = []
        self.remote: RemoteParts = []
        if value is None:
            return
        ivb = index_prefix(value) if prefix else encode_index_value(value)
        for shard in ct.route.shards_for():
            st = local.get(shard)
            if st is None:
                self.remote.append((shard, LOOKUP.request_for(ct.tid, index, ivb, prefix)))
                continue
            with st.read() as r:
                self.rows.extend(r.lookup_rows_raw(ct.table, index, ivb, prefix))

    def fill(self, replies: list[Any]) -> list[tuple[Any, Any]]:
        ct = self.ct
        for found in replies:
            self.rows.extend((k, v) for k, v in found)
        self.rows.sort(key=itemgetter(0))
        return [(ct.kdec(k), ct.loads(v)) for k, v in self.rows]


def local_rows(st: Store, ct: ClientTable, lo: bytes | None, hi: bytes | None, reverse: bool
               ) -> Iterator[tuple[bytes, bytes]]:
    """One shard's encoded rows with ``lo <= key < hi``, from this process's map."""
    with st.read() as r:
        yield from r.scan_raw(ct.table, lo, hi, reverse)


def scan_rows(ct: ClientTable, streams: list[Iterator[tuple[bytes, bytes]]], reverse: bool,
              where: Callable[[Any], bool] | None, limit: int | None
              ) -> Iterator[tuple[Any, Any]]:
    """``scan``: the shards' encoded rows (each stream in key order) merged, decoded, filtered."""
    merged = streams[0] if len(streams) == 1 else heapq.merge(
        *streams, key=itemgetter(0), reverse=reverse)
    return filtered_rows(merged, ct.kdec, ct.loads, where, limit)


def stats_reply(replies: dict[int, Any], client: dict[str, int]) -> dict[str, Any]:
    """``stats``: every shard's statistics as its owner reported them (an error for a shard
    that did not answer) and the client's counters."""
    shards = {s: {"error": str(r)} if isinstance(r, Error) else r
              for s, r in sorted(replies.items())}
    return {"shards": shards, "client": client}
