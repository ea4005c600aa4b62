"""Real shard owners for tests: subprocesses on ipc sockets in a temporary run directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmshard
from lmshard.config import Config, load_config, make_config

REPO = Path(__file__).resolve().parent.parent


class Cluster:
    """N owner processes started from a config file; start, kill, restart, stop them."""

    def __init__(self, base: Path, shards: int = 4, **overrides: Any) -> None:
        self.base = base
        # ipc paths must stay under the unix socket limit: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="lms-"))
        overrides.setdefault("timeout_ms", 3000)
        overrides.setdefault("retries", 4)
        cfg = make_config(base_dir=base, shards=shards, schema="tests.schemas:schema",
                          python_path=[str(REPO)], data_dir=str(base / "data"),
                          run_dir=str(self.run_dir), **overrides)
        self.config_path = base / "lmshard.toml"
        self.config_path.write_text(cfg.to_toml())
        self.config: Config = load_config(self.config_path)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}

    def start(self, shard: int | None = None, wait: bool = True) -> None:
        shards = range(self.config.shards) if shard is None else [shard]
        for s in shards:
            log = self.base / f"owner-{s:02d}.log"
            self.logs[s] = log
            self.procs[s] = subprocess.Popen(
                [sys.executable, "-m", "lmshardd.main", "-c", str(self.config_path),
                 "owner", "--shard", str(s)],
                stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO,
            )
        if wait:
            for s in shards:
                self.wait_ready(s)

    def wait_ready(self, shard: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with lmshard.connect(self.config, timeout_ms=200, retries=0) as c:
            while True:
                proc = self.procs[shard]
                if proc.poll() is not None:
                    raise RuntimeError(f"owner {shard} exited {proc.returncode}: "
                                       f"{self.logs[shard].read_text()[-2000:]}")
                try:
                    c.ping(shard)
                    return
                except lmshard.ShardUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def kill(self, shard: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[shard]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def client(self, **options: Any) -> lmshard.Client:
        return lmshard.connect(self.config, **options)

    def pid(self, shard: int) -> int:
        return self.procs[shard].pid


def env_for_children() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env
