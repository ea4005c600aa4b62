"""Real shard owner processes for tests and benchmarks, on ipc sockets in a temporary run dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmshard.client import Client, connect
from lmshard.config import load_config, make_config
from lmshard.errors import ShardUnavailable


class LocalService:
    """Real shard owner processes for tests, on ipc sockets in a short temporary run directory.

    ``schema`` is the "module:attr" the owners import (``python_path`` is prepended to their
    ``sys.path``); other keyword arguments are config settings (see ``make_config``). Start,
    kill, restart and stop owners; ``client()`` connects to them.
    """

    def __init__(self, base: str | os.PathLike[str], schema: str, *, shards: int = 2,
                 python_path: Sequence[str] = (), **settings: Any) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        # ipc paths must stay under the unix socket limit: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="lms-"))
        settings.setdefault("timeout_ms", 3000)
        settings.setdefault("retries", 4)
        settings.setdefault("sync", False)
        # No reader pool unless asked: with readers.count > 0, clients without local files
        # read through the pool, and this service starts shard owners only.
        settings.setdefault("readers", 0)
        cfg = make_config(base_dir=self.base, shards=shards, schema=schema,
                          python_path=[str(p) for p in python_path],
                          data_dir=str(self.base / "data"), run_dir=str(self.run_dir), **settings)
        self.config_path = self.base / "lmshard.toml"
        self.config_path.write_text(cfg.to_toml())
        self.config = load_config(self.config_path)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}

    def start(self, shard: int | None = None, wait: bool = True) -> None:
        """Start one owner, or all of them; wait until each answers a ping."""
        shards = range(self.config.shards) if shard is None else [shard]
        for s in shards:
            log = self.logs[s] = self.base / f"owner-{s:02d}.log"
            with open(log, "ab") as out:
                self.procs[s] = subprocess.Popen(
                    [sys.executable, "-m", "lmshardd.main", "-c", str(self.config_path),
                     "owner", "--shard", str(s)],
                    stdout=out, stderr=subprocess.STDOUT,
                )
        if wait:
            for s in shards:
                self.wait_ready(s)

    def wait_ready(self, shard: int, timeout: float = 30.0) -> None:
        """Wait until the owner of ``shard`` answers a ping; RuntimeError if it exited."""
        deadline = time.monotonic() + timeout
        with connect(self.config, timeout_ms=200, retries=0) as c:
            while True:
                proc = self.procs[shard]
                if proc.poll() is not None:
                    raise RuntimeError(f"owner {shard} exited {proc.returncode}: "
                                       f"{self.logs[shard].read_text()[-2000:]}")
                try:
                    c.ping(shard)
                    return
                except ShardUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def kill(self, shard: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the owner of ``shard`` and wait for it to exit."""
        proc = self.procs[shard]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def pid(self, shard: int) -> int:
        """The process id of the owner of ``shard``."""
        return self.procs[shard].pid

    def client(self, **options: Any) -> Client:
        """A client connected to these owners (``options`` go to ``lmshard.connect``)."""
        return connect(self.config, **options)

    def stop(self) -> None:
        """SIGTERM every owner (SIGKILL after 20 s) and remove the run directory."""
        terminate(self.procs.values())
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalService:
        try:
            self.start()
        except BaseException:
            self.stop()  # never leave owners running when they could not all come up
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate(procs: Iterable[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM each process still running, then wait for all; SIGKILL one still there after
    ``grace`` seconds."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
