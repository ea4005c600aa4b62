"""Shared fixtures: a schema like a small service's, and temporary stores that always clean up."""

from __future__ import annotations

import os
import shutil
import subprocess
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


# -- two hosts on one machine: network namespaces joined by a veth pair ---------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    """(namespace A, address A, namespace B, address B), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"lmsA{tag}", f"lmsB{tag}"
    veth_a, veth_b = f"lmva{tag}", f"lmvb{tag}"
    net = f"10.201.{os.getpid() % 200 + 20}"
    addr_a, addr_b = f"{net}.1", f"{net}.2"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            made.append(ns)
        steps = [
            ("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b,
             "netns", ns_b),
            ("-n", ns_a, "addr", "add", f"{addr_a}/24", "dev", veth_a),
            ("-n", ns_b, "addr", "add", f"{addr_b}/24", "dev", veth_b),
            ("-n", ns_a, "link", "set", veth_a, "up"),
            ("-n", ns_b, "link", "set", veth_b, "up"),
            ("-n", ns_a, "link", "set", "lo", "up"),
            ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, (step, r.stderr)
        yield ns_a, addr_a, ns_b, addr_b
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # takes the veth pair with it
