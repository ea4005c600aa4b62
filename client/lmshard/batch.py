"""``Client.batch()``: writes collected, then sent as one message per shard, atomic per shard.

A batch over several shards is split per shard; each part is applied atomically by its owner.
When some parts commit and others fail, ``BatchPartiallyApplied`` says which (documented, not
hidden).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmshard.client_tables import ClientTables
from lmshard.errors import BatchPartiallyApplied, Error
from lmshard.protocol import (
    OP_CAS,
    OP_DELETE,
    OP_INCR,
    OP_PERSIST,
    OP_PUT,
    cas_arg,
    incr_delta,
    op,
)
from lmshard.txn import TableRef

PartOutcome = tuple[Error | None, Any]
"""A shard's part of a batch: (None, reply body ``[txn id, results]``) or (its Error, None)."""
SendParts = Callable[[dict[int, list[list[Any]]], int], dict[int, PartOutcome]]
"""Sends each shard's ops as one write, routed by the slot map of the version given, and returns
each shard's outcome."""


class Batch:
    """Writes collected by ``Client.batch()`` and sent, one message per shard, on exit.

    Bad keys and values raise at the call, before anything is sent. After the block,
    ``results`` holds each op's result in call order and ``txn_ids`` each shard's txn id.
    """

    def __init__(self, tables: ClientTables, send_parts: SendParts) -> None:
        self._tables = tables
        self._send_parts = send_parts
        self.map_version = tables.routes.version
        """The version of the slot map the ops are routed by (read before the first is)."""
        self._parts: dict[int, list[list[Any]]] = {}
        self._order: list[tuple[int, int]] = []
        self.results: list[Any] = []
        self.txn_ids: dict[int, int] = {}

    def _add(self, table: TableRef, key: Any, code: int, arg: Any) -> None:
        ct = self._tables[table]
        kb = ct.kenc(key)
        shard = ct.shard(key, kb)
        part = self._parts.setdefault(shard, [])
        self._order.append((shard, len(part)))
        part.append(op(code, ct.tid, kb, arg))

    def put(self, table: TableRef, key: Any, value: Any, ttl: float | None = None) -> None:
        # The hot path of batched writes: _add and protocol.op inlined.
        ct = self._tables[table]
        kb = ct.kenc(key)
        vb = ct.dumps(value) if ttl is None else ct.encode(value, ttl)
        shard = ct.shard(key, kb)
        part = self._parts.get(shard)
        if part is None:
            part = self._parts[shard] = []
        self._order.append((shard, len(part)))
        part.append([OP_PUT, ct.tid, kb, vb])

    def delete(self, table: TableRef, key: Any) -> None:
        self._add(table, key, OP_DELETE, None)

    def incr(self, table: TableRef, key: Any, delta: int = 1) -> None:
        self._add(table, key, OP_INCR, incr_delta(delta))

    def persist(self, table: TableRef, key: Any) -> None:
        """Make the row never expire (result: whether it had an expiry)."""
        self._tables[table].check_expiring("persist")
        self._add(table, key, OP_PERSIST, None)

    def cas(self, table: TableRef, key: Any, value: Any, expected: Any = None, *,
            expected_hash: bytes | None = None) -> None:
        """Put ``value`` if the row holds ``expected`` (None: absent); a mismatch fails this
        shard's part of the batch with ConflictError."""
        ct = self._tables[table]
        vb = ct.dumps(value)
        eb = None if expected is None or expected_hash is not None else ct.dumps(expected)
        self._add(table, key, OP_CAS, cas_arg(vb, eb, expected_hash))

    def __len__(self) -> int:
        return len(self._order)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._order:
            self.send()

    def send(self) -> None:
        """Send every shard's part and wait for the outcomes (what the end of the ``with``
        block does); the first error when no part committed, BatchPartiallyApplied when
        some did."""
        self.settle(self._send_parts(self._parts, self.map_version))

    def settle(self, outcomes: dict[int, PartOutcome]) -> None:
        """Take each shard's outcome: ``results`` and ``txn_ids``, or raise the error (the
        async batch sends its parts its own way and settles them here)."""
        committed = {s: o[1][0] for s, o in outcomes.items() if o[0] is None}
        failed = {s: o[0] for s, o in outcomes.items() if o[0] is not None}
        self.txn_ids = committed
        if failed:
            if not committed:
                raise next(iter(failed.values()))
            raise BatchPartiallyApplied(
                f"batch committed on shards {sorted(committed)} and failed on "
                f"{sorted(failed)}: " + "; ".join(f"shard {s}: {e}" for s, e in failed.items()),
                committed=committed, failed=failed,
            )
        self.results = [outcomes[s][1][1][i] for s, i in self._order]
