"""A client or reader pool a program drops without closing is collected: the garbage collector
never hangs on its ZeroMQ context (``lmshard.contexts``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.cluster import Cluster, env_for_children

DROP = """
import gc, sys, weakref
import lmshard
from lmshard.remote import ReaderPool

c = lmshard.connect(sys.argv[1])
for s in range(c.shards):
    c.ping(s)                        # a request socket per shard
with c.writer() as w:                # and the writer's streams
    w.put("counters", "dropped", 1)
alive = weakref.ref(c)
del c, w
gc.collect()                         # a client is in reference cycles: only this frees it
assert alive() is None, "the client was not collected"

from lmshard.config import load_config
pool = ReaderPool(load_config(sys.argv[1]))
pool.ping_each(timeout_ms=2000)
alive = weakref.ref(pool)
del pool
gc.collect()
assert alive() is None, "the reader pool was not collected"
print("collected")
"""


def test_a_client_dropped_without_close_is_collected_without_hanging(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, shards=2, readers=1)
    cluster.start()
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(DROP),
                               str(cluster.config_path)], env=env_for_children(),
                              capture_output=True, text=True, timeout=60)
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "collected"
