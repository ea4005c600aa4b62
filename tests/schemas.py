"""Schemas the daemon tests' shard owners import (``schema = "tests.schemas:schema"``)."""

from __future__ import annotations

import lmshard

USERS_ID = "7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a01"
EVENTS_ID = "7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a02"
COUNTERS_ID = "7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a03"
BLOBS_ID = "7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a04"
ITEMS_ID = "7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a05"

schema = lmshard.Schema("fleet")
# Pinned: the whole table on one shard, so its unique email index holds across all rows.
users = schema.table("users", table_id=USERS_ID, key="uuid", value="cbor", pinned=True)
users.index("by_email", lambda v: v["email"], unique=True)
# Sharded by series: one series' events live together (a function, so scans read every shard).
events = schema.table("events", table_id=EVENTS_ID, key=("str", "uint64"), value="msgpack",
                      shard_key=lambda k: k[0])
counters = schema.table("counters", table_id=COUNTERS_ID, key="str", value="cbor")
blobs = schema.table("blobs", table_id=BLOBS_ID, key="uint64", value="bytes")
items = schema.table("items", table_id=ITEMS_ID, key="uint64", value="cbor")
items.index("by_group", lambda v: v["group"])
# Plain rows, no index: the benchmarks' table.
records = schema.table("records", table_id="7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a06", key="uint64",
                       value="cbor")
# Sharded by the key's first element, declared as such: a prefix scan naming the series reads
# only the shard that holds it.
readings = schema.table("readings", table_id="7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a07",
                        key=("str", "uint64"), value="msgpack", shard_key=1)
# A counter and the idempotency keys of the requests that moved it, on one shard (shard_key=1:
# the counter's name), so one batch checks the key and counts atomically (docs/web-services.md).
tallies = schema.table("tallies", table_id="7d1f0c3a-5e2b-4a8c-9f6d-0b1e2c3d4a08",
                       key=("str", "str"), value="cbor", shard_key=1)
