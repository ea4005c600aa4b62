"""The docs' async web app (docs/async.md) under a real uvicorn process, over real HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import REPO, Cluster

DOC = REPO / "docs" / "async.md"


def app_source() -> str:
    """The python block of docs/async.md that is the app (it starts with ``# app.py``)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    [app] = [b for b in blocks if b.startswith("# app.py")]
    return app


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Cluster, subprocess.Popen[str]]]:
    (tmp_path / "app.py").write_text(app_source())
    with Cluster(tmp_path / "svc", shards=2) as cl:
        env = dict(os.environ, LMSHARD_CONFIG=str(cl.config_path),
                   PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO),
                                               os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--loop", "uvloop", "--host",
             "127.0.0.1", "--port", "0"],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            url = _started(proc)
            yield url, cl, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _started(proc: subprocess.Popen[str]) -> str:
    """The URL uvicorn serves on (it picks the port: no port is bound and released here)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return m.group(1)
    raise AssertionError("uvicorn did not start:\n" + "".join(seen))


def test_the_docs_web_app_counts_concurrent_requests_once(
        server: tuple[str, Cluster, subprocess.Popen[str]]) -> None:
    url, cl, proc = server

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            sent = [http.post(f"/visit/p{i % 3}", params={"who": f"u{i}"}) for i in range(90)]
            return list(await asyncio.gather(*sent))

    replies = asyncio.run(main())
    assert all(r.status_code == 200 for r in replies)
    for page in range(3):
        counts = sorted(r.json()["visits"] for r in replies if r.json()["page"] == f"p{page}")
        assert counts == list(range(1, 31))  # each request's increment once
    with httpx.Client(base_url=url) as http:
        got = http.get("/pages/p1").json()
    assert got["visits"] == 30 and got["last"].startswith("u")
    with cl.client() as c:  # the same rows through the sync client
        assert c.get("counters", "visits:p2") == 30
    proc.send_signal(signal.SIGTERM)  # lifespan shutdown closes the client
    proc.wait(timeout=30)  # (uvicorn exits by the signal it handled: -SIGTERM)
    assert proc.stderr is not None
    assert "Application shutdown complete" in proc.stderr.read()
