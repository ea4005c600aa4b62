"""A WSGI app on lmshard, as docs/web-services.md describes it (run by tests/test_web_server.py).

    gunicorn -w 4 'webapp:app'          # LMSHARD_CONFIG names the service's lmshard.toml

GET /hit/NAME increments a counter and answers its value; GET /get/NAME reads it (a local
read: no owner involved). Each call runs under a deadline, and a shard that cannot be reached
answers 503 at once instead of holding the worker.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lmshard

DEADLINE = float(os.environ.get("WEBAPP_DEADLINE", "0.5"))
"""Seconds a request may wait for a shard owner."""

_client: lmshard.Client | None = None


def client() -> lmshard.Client:
    """This worker's client: made on first use, after the web server forked its workers
    (with --preload, a client made in the master would be inherited; lmshard notices and
    reopens its sockets and environments in each worker, but making it late is simplest)."""
    global _client
    if _client is None:
        _client = lmshard.connect()
    return _client


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    parts = environ.get("PATH_INFO", "").strip("/").split("/")
    if len(parts) != 2 or parts[0] not in ("hit", "get"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /hit/NAME or /get/NAME\n"]
    action, name = parts
    c = client()
    try:
        with c.deadline(DEADLINE):
            if action == "hit":
                value = c.incr("counters", name)
            else:
                value = c.get("counters", name, 0)
    except lmshard.ShardUnavailable as exc:  # includes DeadlineExceeded and the open breaker
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                   ("Retry-After", "1")])
        return [f"{exc.message}\n".encode()]
    body = json.dumps({"name": name, "value": value, "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
