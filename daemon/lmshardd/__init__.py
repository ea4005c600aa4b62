"""lmshardd: the lmshard daemon (shard owners, reader pool, monitor, backup)."""
