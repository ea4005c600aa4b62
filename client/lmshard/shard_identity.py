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


def check_shard_identity(config: Config, shard: int, schema: Any, meta: dict[bytes, bytes],
                         path: Path) -> None:
    """Raise SchemaMismatch if the records ``meta`` of shard directory ``path`` belong to
    another shard number, another slot map, or place a table of ``schema`` differently."""
    if b"shard_id" in meta and meta[b"shard_id"] != str(shard).encode():
        raise SchemaMismatch(
            f"{path} holds shard {meta[b'shard_id'].decode()}, the config says shard {shard}",
            hint="check data_dir and the shard number; never move shard directories",
        )
    if b"slot_map" in meta and meta[b"slot_map"] != config.slot_map.digest().encode():
        raise SchemaMismatch(
            f"{path} was written with a different slot map than the config's",
            hint="restore the slot map the data was written with; changing it needs a "
            "migration of rows between shards",
        )
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


def identity_records(config: Config, shard: int) -> dict[bytes, bytes]:
    """The records an owner writes into shard ``shard``'s meta database when it opens it."""
    return {
        b"shard_id": str(shard).encode(),
        b"slot_map": config.slot_map.digest().encode(),
        b"shards": str(config.shards).encode(),
    }
