"""The demo schema the default config serves (``schema = "lmshard.demo:schema"``).

Three tables, each named on disk by its UUID:

- ``users``: UUID keys, spread over every shard by key; non-unique index ``by_country``.
- ``orders``: (user id, order id) keys sharded by the user id, so a user's orders live on the
  user's shard and a prefix scan of one user stays on one shard; index ``by_status``.
- ``counters``: str keys with integer values, bumped with ``incr``.

Services' examples import these tables; the workload ``lmshard demo`` runs against them is
operator tooling and lives in ``lmshard.ops.demo``.
"""

from __future__ import annotations

import lmshard

USERS_ID = "3f0c2a8e-6d51-4b7a-9c1e-5a2d8f4b6e10"
ORDERS_ID = "3f0c2a8e-6d51-4b7a-9c1e-5a2d8f4b6e11"
COUNTERS_ID = "3f0c2a8e-6d51-4b7a-9c1e-5a2d8f4b6e12"

COUNTRIES = ("de", "fr", "nl", "se", "us", "jp")
"""The values of a user's ``country``, the ``by_country`` index."""
STATUSES = ("new", "paid", "shipped")
"""The values of an order's ``status``, the ``by_status`` index."""

schema = lmshard.Schema("demo")
users = schema.table("users", table_id=USERS_ID, key="uuid", value="cbor",
                     doc="people; key: user id")
users.index("by_country", lambda v: v["country"])
orders = schema.table("orders", table_id=ORDERS_ID, key=("uuid", "uuid"), value="cbor",
                      shard_key=lambda k: k[0], doc="orders; key: (user id, order id)")
orders.index("by_status", lambda v: v["status"])
counters = schema.table("counters", table_id=COUNTERS_ID, key="str", value="cbor",
                        doc="named integer counters")
