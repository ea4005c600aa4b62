"""The ZAP handler of lmshard's CURVE servers: pyzmq's ``ThreadAuthenticator`` allowing the
public keys of one directory per ZAP domain, logging every refusal (rate-limited).

Only processes that serve (owners, readers, monitor) import it, through
``lmshard.security.secure_server``: pyzmq's authenticator brings asyncio along, which a client
has no use for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from lmshard.security import MAX_REMEMBERED_REFUSALS, REFUSAL_LOG_INTERVAL, ZAP_DOMAIN_PREFIX

log = logging.getLogger("lmshard.security")


class _AllowList:
    """The public keys in one directory, re-read when the directory changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: frozenset[bytes] = frozenset()

    def keys(self) -> frozenset[bytes]:
        """The allowed keys, re-read if the directory changed; none if it cannot be read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            return frozenset()  # the directory vanished: nobody gets in
        if stamp != self._stamp:
            try:
                self._keys = frozenset(zmq.auth.load_certificates(self.path))
            except (OSError, ValueError) as exc:
                log.error("cannot read the allowed client keys in %s: %s; refusing every "
                          "client until it is fixed", self.path, exc)
                self._keys = frozenset()
            self._stamp = stamp
        return self._keys


class CurveAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, allowing the keys of one directory per ZAP domain and logging
    every refusal (rate-limited per address and key)."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        super().__init__(context, log=logging.getLogger("lmshard.security.zap"))
        self.allow_lists: dict[str, _AllowList] = {}
        self.refused = 0
        self._last_logged: dict[tuple[str, str], float] = {}
        self._suppressed = 0
        self._peer = ("?", "?")

    def domain_for(self, directory: Path) -> str:
        """The ZAP domain whose clients must hold a key in ``directory`` (one per directory)."""
        domain = ZAP_DOMAIN_PREFIX + hashlib.blake2b(
            str(directory).encode(), digest_size=8).hexdigest()
        self.allow_lists.setdefault(domain, _AllowList(directory))
        return domain

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        mechanism = msg[5].decode("ascii", "replace") if len(msg) > 5 else "?"
        self._peer = (address, mechanism)
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allow = self.allow_lists.get(domain)
        z85_key = z85.encode(client_key)
        if allow is not None and z85_key in allow.keys():
            return True, b"OK"
        self._refuse(z85_key.decode("ascii"),
                     f"not in {allow.path}" if allow else f"unknown ZAP domain {domain!r}")
        return False, b"Unknown key"

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200" and status_text != b"Unknown key":
            self._refuse("-", status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def _refuse(self, key: str, why: str) -> None:
        self.refused += 1
        address, mechanism = self._peer
        now = time.monotonic()
        last = self._last_logged.get((address, key))
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            self._suppressed += 1
            return
        if len(self._last_logged) > MAX_REMEMBERED_REFUSALS:
            self._last_logged.clear()
        self._last_logged[(address, key)] = now
        more = f" ({self._suppressed} more refusals not logged)" if self._suppressed else ""
        self._suppressed = 0
        log.warning("refused %s client at %s: key %s %s%s", mechanism, address, key, why, more)


_authenticators: weakref.WeakKeyDictionary[Any, CurveAuthenticator] = (
    weakref.WeakKeyDictionary())
_auth_lock = threading.Lock()


def authenticator(context: zmq.Context[Any]) -> CurveAuthenticator:
    """The context's ZAP handler, started on first use (before any CURVE server binds:
    without a ZAP handler libzmq would let every client key in)."""
    with _auth_lock:
        auth = _authenticators.get(context)
        if auth is None or not auth.is_alive():
            auth = CurveAuthenticator(context)
            auth.start()
            _authenticators[context] = auth
        return auth


def stop_authenticator(context: zmq.Context[Any]) -> None:
    """Stop the context's ZAP thread (before ``context.term()`` in a process that goes on)."""
    with _auth_lock:
        auth = _authenticators.pop(context, None)
    if auth is not None:
        auth.stop()
