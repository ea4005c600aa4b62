"""What a shard directory records about its place in the service, and the check that refuses to
serve it under another config or schema.

An owner records, in its store's meta database, which shard it is, the slot map it routes by
and how each table is placed on shards (``pinned``, ``shard_key``, by key). Rows written under
one of these would be looked for on other shards under another, so the owner refuses to start,
and ``lmshard up`` refuses before it starts anything (``lmshard.ops.preflight``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2

from lmshard.config import Config
from lmshard.errors import SchemaMismatch
from lmshard.slot_state import META_VERSION, check_slot_state, config_state


def check_shard_identity(config: Config, shard: int, schema: Any, meta: dict[bytes, bytes],
                         path: Path) -> None:
    """Raise SchemaMismatch if the records ``meta`` of shard directory ``path`` belong to
    another shard number, another slot map, or place a table of ``schema`` differently."""
    if b"shard_id" in meta and meta[b"shard_id"] != str(shard).encode():
        raise SchemaMismatch(
            f"{path} holds shard {meta[b'shard_id'].decode()}, the config says shard {shard}",
            hint="check data_dir and the shard number; never move shard directories",
        )
    check_slot_state(config, meta, path)
    for t in schema.tables.values():
        record = meta.get(b"table/" + str(t.table_id).encode())
        was = cbor2.loads(record).get("placement") if record else None
        if was is not None and was != t.placement:
            raise SchemaMismatch(
                f"table {t.name!r} ({t.table_id}) was placed on shards by {was}, the "
                f"schema now declares {t.placement}: its rows would be looked for on "
                "other shards",
                hint="keep the table's pinned/shard_key declaration, or copy its rows "
                "into a new table declared the new way",
            )


def identity_records(config: Config, shard: int,
                     meta: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """The records an owner writes into shard ``shard``'s meta database when it opens it
    (``meta``: the records it has): its number, and the config's slot map as the shard's
    slot state unless the shard records one already (``lmshard.slot_state``)."""
    records = {b"shard_id": str(shard).encode()}
    if meta is None or META_VERSION not in meta:
        records.update(config_state(config).records())
        records[b"shards"] = str(config.shards).encode()
    return records
