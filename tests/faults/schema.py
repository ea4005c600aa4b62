"""The fault campaign's tables (``schema = "tests.faults.schema:schema"``).

- ``rows``: registers keyed (group, name), sharded by group; a row may claim an email, unique
  within its group (the index is sharded like the table, so one owner enforces it). A batch
  that writes registers of a group and claims an email someone holds fails as a whole: its
  register values must never be seen.
- ``counters``: integers bumped with ``incr``.
"""

from __future__ import annotations

import lmshard

schema = lmshard.Schema("faults")
rows = schema.table("rows", table_id="4c0e7f1a-2b3d-4e5f-8a6b-7c8d9e0f1a01", key=("str", "str"),
                    value="cbor", shard_key=lambda k: k[0])
rows.index("by_email", lambda v: v["email"], unique=True, nullable=True,
           shard_key=lambda v: v["group"])
counters = schema.table("counters", table_id="4c0e7f1a-2b3d-4e5f-8a6b-7c8d9e0f1a02", key="str",
                        value="cbor")
