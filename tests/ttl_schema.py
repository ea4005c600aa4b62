"""The schema of the tests of rows that expire (``tests/test_ttl*.py``); the owners import it
as ``tests.ttl_schema:schema``."""

from __future__ import annotations

import lmshard

schema = lmshard.Schema("ttl")
# Login sessions: an hour by default, found by user.
sessions = schema.table("sessions", table_id="3e0c5b1a-8d2f-4c6e-9a7b-1f2e3d4c5b01", key="str",
                        value="cbor", ttl=3600)
sessions.index("by_user", lambda v: v["user"])
# Rows that expire only when a put says so; a unique index, so an expired row's value is freed.
tokens = schema.table("tokens", table_id="3e0c5b1a-8d2f-4c6e-9a7b-1f2e3d4c5b02", key="uint64",
                      value="msgpack", ttl=0, pinned=True)
tokens.index("by_token", lambda v: v["token"], unique=True, nullable=True)
# The idempotency keys of docs/web-services.md, kept a day.
tallies = schema.table("tallies", table_id="3e0c5b1a-8d2f-4c6e-9a7b-1f2e3d4c5b03",
                       key=("str", "str"), value="cbor", shard_key=1, ttl=86400)
# The same rows with and without an expiry: the benchmark's pair and the sweep drill's table.
cache = schema.table("cache", table_id="3e0c5b1a-8d2f-4c6e-9a7b-1f2e3d4c5b04", key="uint64",
                     value="cbor", ttl=0)
cache.index("by_group", lambda v: v.get("g"), nullable=True)
plain = schema.table("plain", table_id="3e0c5b1a-8d2f-4c6e-9a7b-1f2e3d4c5b05", key="uint64",
                     value="cbor")
