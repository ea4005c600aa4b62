"""Shared fixtures: a schema like a small service's, and temporary stores that always clean up."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import lmshard

USERS_ID = "5a3c8f1e-2b0d-4c39-9a7e-1f6d2c4b8e01"
EVENTS_ID = "9b1e7d2c-4a5f-4e8b-8c3d-2e7f1a6b9c02"
COUNTERS_ID = "c4d2e8f1-6b3a-4d7c-9e1f-3a8b2c5d7e03"
BLOBS_ID = "e1f3a5b7-c9d2-4e6f-8a1b-4c7d9e2f6a04"


def make_schema() -> lmshard.Schema:
    schema = lmshard.Schema("test")
    users = schema.table("users", table_id=USERS_ID, key="uuid", value="cbor")
    users.index("by_email", lambda v: v["email"], unique=True)
    users.index("by_country_age", lambda v: (v["country"], v["age"]))
    users.index("by_phone", lambda v: v.get("phone"), unique=True, nullable=True)
    schema.table("events", table_id=EVENTS_ID, key=("str", "timestamp"), value="msgpack")
    schema.table("counters", table_id=COUNTERS_ID, key="str", value="cbor")
    schema.table("blobs", table_id=BLOBS_ID, key="uint64", value="bytes")
    return schema


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, so ipc socket paths stay under the unix socket limit
    (pytest's tmp_path may be too long for them)."""
    d = Path(tempfile.mkdtemp(prefix="lms-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_dir(short_dir: Path) -> Path:
    """A short run directory for a service's sockets."""
    return short_dir


@pytest.fixture
def schema() -> lmshard.Schema:
    return make_schema()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path, schema: lmshard.Schema) -> Iterator[lmshard.Store]:
    with lmshard.open(store_path, schema) as s:
        yield s


def user(email: str, country: str = "de", age: int = 30, **extra: object) -> dict[str, object]:
    return {"email": email, "country": country, "age": age, **extra}


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[object]:
    """Four real shard owner processes for one test; always stopped afterwards."""
    from tests.cluster import Cluster

    c = Cluster(tmp_path)
    c.start()
    try:
        yield c
    finally:
        c.stop()
