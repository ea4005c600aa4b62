"""The four systems as the suite's parent process sees them: start, stop, what to watch.

Each wraps a ``bench.sys_*`` module (whose functions are the workloads the workers run) with
what that system needs around it: a fresh directory, a server process, its durability
settings, its version. ``start`` returns the spec every worker of this system gets.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class System:
    key = ""
    label = ""
    module_name = ""
    durability = ""
    """How an acknowledged write is made durable, as the results name it."""

    def __init__(self) -> None:
        self.module: ModuleType = importlib.import_module(self.module_name)

    @staticmethod
    def missing() -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def start(self, base: Path) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def servers(self) -> list[int]:
        """Pids whose peak RSS is the 'server' memory of a workload."""
        return []

    def durable_writes(self, on: bool) -> None:
        """Switch to the durability acked-write workloads use (only Redis has two modes)."""

    def every_second(self) -> AbstractContextManager[dict[str, Any]]:
        """For the block: acked writes fsynced once a second, not each (Redis's appendfsync
        everysec); the spec workers get then. Only Redis and lmshard have it."""
        raise NotImplementedError(f"{self.label} has no fsync-each-second mode")

    def workload(self, name: str) -> Any:
        return getattr(self.module, name, None)


class Raw(System):
    key, label, module_name = "raw", "raw py-lmdb", "bench.sys_raw"
    durability = "fsync per commit (sync=True)"

    def version(self) -> str:
        import lmdb

        return f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"

    def start(self, base: Path) -> dict[str, Any]:
        return {"path": str(base / "raw")}


class Zlmdb(System):
    key, label, module_name = "zlmdb", "zlmdb", "bench.sys_zlmdb"
    durability = "fsync per commit (sync=True)"

    @staticmethod
    def missing() -> str | None:
        if importlib.util.find_spec("zlmdb") is None:
            return "zlmdb is not installed (pip install 'lmshard[bench]')"
        return None

    def version(self) -> str:
        from importlib.metadata import version

        return f"zlmdb {version('zlmdb')}"

    def start(self, base: Path) -> dict[str, Any]:
        return {"path": str(base / "zlmdb")}


class Redis(System):
    key, label, module_name = "redis", "Redis", "bench.sys_redis"
    durability = "acked writes: appendonly + appendfsync always; bulk inserts: no persistence"

    def __init__(self) -> None:
        super().__init__()
        self.server: Any = None

    @staticmethod
    def missing() -> str | None:
        from bench.sys_redis import RedisServer

        return RedisServer.missing()

    def version(self) -> str:
        from importlib.metadata import version

        return f"redis-server {self.module.RedisServer.version()}, redis-py {version('redis')}"

    def start(self, base: Path) -> dict[str, Any]:
        self.server = self.module.RedisServer(base / "redis")
        self.server.start()
        return {"socket": self.server.socket}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def servers(self) -> list[int]:
        return [self.server.pid] if self.server is not None else []

    def durable_writes(self, on: bool) -> None:
        self.server.durable(on)

    @contextmanager
    def every_second(self) -> Iterator[dict[str, Any]]:
        self.server.durable(True, fsync="everysec")
        try:
            yield {"socket": self.server.socket}
        finally:
            self.server.durable(False)


class Lmshard(System):
    key, label, module_name = "lmshard", "lmshard", "bench.sys_lmshard"
    durability = "fsync per group commit (durability.sync = true)"

    def __init__(self, shards: int = 4, readers: int = 2, **settings: Any) -> None:
        """``settings`` are further config settings of the service (``make_config``'s names,
        e.g. ``changes_enabled=False``)."""
        super().__init__()
        self.shards = shards
        self.readers = readers
        self.settings = settings
        self.service: Any = None
        self.reader_procs: list[subprocess.Popen[bytes]] = []

    def version(self) -> str:
        import lmshard

        return f"lmshard {lmshard.__version__}"

    @staticmethod
    def readers_missing() -> str | None:
        if importlib.util.find_spec("lmshardd.readers") is None:
            return "the reader pool (lmshardd readers) is not available in this lmshard"
        return None

    def start(self, base: Path) -> dict[str, Any]:
        from lmshard.local_service import LocalService

        readers = 0 if self.readers_missing() else self.readers
        self.service = LocalService(
            base / "lmshard", "bench.schema:schema", shards=self.shards,
            python_path=[str(REPO)], sync=True, map_size="1GiB", readers=readers,
            timeout_ms=30000, retries=2, **self.settings)
        self.service.start()
        return {"config": str(self.service.config_path)}

    @contextmanager
    def every_second(self) -> Iterator[dict[str, Any]]:
        """A second service beside this one, with ``durability.flush_interval = 1``, for the
        block (its owners are ``servers()`` meanwhile)."""
        main, settings = self.service, self.settings
        self.service, self.settings = None, dict(settings, flush_interval=1.0)
        try:
            yield self.start(main.base.parent / "every-second")
        finally:
            if self.service is not None:
                self.service.stop()
            self.service, self.settings = main, settings

    def start_readers(self) -> None:
        """Start the reader pool (``lmshardd readers --index I``); wait until each answers."""
        from lmshard.remote import ReaderPool

        svc = self.service
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get(
            "PYTHONPATH", "")]))
        for i in range(svc.config.readers):
            log = open(svc.base / f"reader-{i:02d}.log", "ab")
            self.reader_procs.append(subprocess.Popen(
                [sys.executable, "-m", "lmshardd.main", "-c", str(svc.config_path), "readers",
                 "--index", str(i)], stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 30
        with ReaderPool(svc.config, timeout_ms=200, retries=0) as pool:
            while not all(h is not None for h in pool.ping_each(200).values()):
                for p in self.reader_procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"a reader exited with {p.returncode}; see {svc.base}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the reader pool did not answer within 30 s")
                time.sleep(0.05)

    def stop(self) -> None:
        for p in self.reader_procs:
            if p.poll() is None:
                p.terminate()
        for p in self.reader_procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.reader_procs = []
        if self.service is not None:
            self.service.stop()
            self.service = None

    def servers(self) -> list[int]:
        """The shard owners (the reader pool's pids are ``reader_pids``)."""
        return [] if self.service is None else [p.pid for p in self.service.procs.values()]

    def reader_pids(self) -> list[int]:
        return [p.pid for p in self.reader_procs]


ALL: list[type[System]] = [Raw, Zlmdb, Redis, Lmshard]
