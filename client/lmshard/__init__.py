"""lmshard: a typed, indexed table layer over LMDB, embedded or sharded behind a daemon."""

from __future__ import annotations

__version__ = "0.1.0"
