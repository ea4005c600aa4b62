"""Real shard owners for this suite's tests: lmshard.testing.LocalService on tests.schemas."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmshard.local_service import LocalService

REPO = Path(__file__).resolve().parent.parent


class Cluster(LocalService):
    """Owners serving ``tests.schemas:schema`` (4 shards unless told), fsync on like production."""

    def __init__(self, base: Path, shards: int = 4, **overrides: Any) -> None:
        overrides.setdefault("sync", True)
        super().__init__(base, "tests.schemas:schema", shards=shards,
                         python_path=[str(REPO)], **overrides)


def dealer(cluster: LocalService, shard: int) -> Any:
    """A DEALER socket of this process's context connected to ``shard``'s owner, as a client's
    (LINGER 0, a 5 s receive timeout), for tests that speak the wire protocol themselves."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(cluster.config.endpoint(shard))
    return sock


def lmshard_cli(*args: str, timeout: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``lmshard ARGS`` in a new process, as an operator would (this repo's tests package
    importable, for schemas like ``tests.schemas:schema``)."""
    return subprocess.run([sys.executable, "-m", "lmshard.ops.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env if env is not None else env_for_children())


def env_for_children() -> dict[str, str]:
    """The environment for a child process that must import this repo's tests package."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def restore_into(backup_dir: Path, service: LocalService) -> None:
    """``lmshard restore BACKUP --to DATA_DIR -c CONFIG`` into ``service`` (not running), as
    an operator would; it must succeed."""
    from lmshard.ops.cli import main

    assert main(["restore", str(backup_dir), "--to", str(service.config.data_dir), "-c",
                 str(service.config_path), "-q"]) == 0


WAIT = 30.0
"""Longest wait for any condition (generous: the machine may be busy)."""


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Call ``probe`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
