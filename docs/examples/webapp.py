"""A WSGI app on lmshard, as docs/web-services.md describes it (run by tests/test_web_server.py).

    gunicorn -w 4 'webapp:app'          # LMSHARD_CONFIG names the service's lmshard.toml

GET /hit/NAME increments a counter and answers its value; GET /get/NAME reads it (a local
read: no owner involved); POST /count/NAME with an Idempotency-Key header counts once per key,
however often a client retries the request. Each call runs under a deadline, and a shard that
cannot be reached answers 503 at once instead of holding the worker.
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


def count_once(c: lmshard.Client, name: str, key: str) -> int:
    """Add 1 to tally ``name`` unless a request with idempotency key ``key`` already did. The
    key's row and the tally share a shard (the table's shard_key is the tally's name), so one
    batch does both or neither: a retried request finds its key and counts nothing."""
    if not key:
        raise lmshard.TransactionError("POST /count needs an Idempotency-Key header")
    try:
        with c.batch() as b:
            b.cas("tallies", (name, key), True, expected=None)  # the key must be new
            b.incr("tallies", (name, ""))
    except lmshard.ConflictError:
        pass  # counted by an earlier try of this request
    value: int = c.get("tallies", (name, ""), 0)
    return value


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    parts = environ.get("PATH_INFO", "").strip("/").split("/")
    if len(parts) != 2 or parts[0] not in ("hit", "get", "count"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /hit/NAME, /get/NAME or POST /count/NAME\n"]
    action, name = parts
    c = client()
    try:
        with c.deadline(DEADLINE):
            if action == "hit":
                value = c.incr("counters", name)
            elif action == "get":
                value = c.get("counters", name, 0)
            else:
                value = count_once(c, name, environ.get("HTTP_IDEMPOTENCY_KEY", ""))
    except lmshard.TransactionError as exc:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [f"{exc.message}\n".encode()]
    except lmshard.ShardUnavailable as exc:  # includes DeadlineExceeded and the open breaker
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                   ("Retry-After", "1")])
        return [f"{exc.message}\n".encode()]
    body = json.dumps({"name": name, "value": value, "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
