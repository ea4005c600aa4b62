"""Socket security: where CurveZMQ is applied to every server and client socket.

Both sides call these functions on every socket they create, so one module decides whether an
endpoint needs CURVE:

- ipc endpoints are left as they are; the run directory's permissions (mode 0700) protect them,
  and a server warns when that directory is open to other users;
- a tcp endpoint on a loopback address may go without CURVE; with ``curve.server_secret_key``
  (server) or ``curve.server_public_key`` (client) configured it uses CURVE as well;
- a tcp endpoint on any other address requires CURVE: ``secure_server`` and ``secure_client``
  raise ``ConfigError`` when the keys are not configured.

A CURVE server authenticates clients through ZAP: one authenticator thread per ZeroMQ context
(pyzmq's ``ThreadAuthenticator``) allows exactly the public keys in ``allowed_client_keys``
(``*.key`` certificate files; the directory is re-read when it changes, so adding a client
needs no restart). Each refusal is logged on the ``lmshard.security`` logger with the peer's
address and key; handshakes that fail before ZAP (a client without CURVE, or with the wrong
server key) are logged from a socket monitor. A refused client is not told anything: its
requests time out, and ``auth_hint`` words the client's error accordingly.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from lmshard import config as config_module
from lmshard.config import ConfigError, split_host_port

log = logging.getLogger("lmshard.security")

ZAP_DOMAIN_PREFIX = "lmshard:"
"""ZAP domains are this plus a digest of the allow-list directory: one domain per directory."""
REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same refused (address, key)."""
MAX_REMEMBERED_REFUSALS = 4096
"""Refused (address, key) pairs remembered for rate limiting before the memory is cleared."""
KEY_FILE_GLOB = "*.key"
"""Public certificates in an allow-list directory (the czmq/pyzmq convention)."""

_HANDSHAKE_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol: a client without "
    "CURVE, or one that does not know this server's public key)",
}


# -- which endpoints need what ------------------------------------------------------------------


def is_tcp(endpoint: str) -> bool:
    """True for a ``tcp://`` endpoint (ipc endpoints are guarded by the run directory)."""
    return endpoint.startswith("tcp://")


def is_loopback(endpoint: str) -> bool:
    """True for a tcp endpoint on 127.0.0.0/8, ::1 or localhost (reachable from this host only)."""
    if not is_tcp(endpoint):
        return False
    host, _port = split_host_port(endpoint[len("tcp://"):])
    return config_module.is_loopback(host)


def needs_curve(endpoint: str) -> bool:
    """A tcp endpoint other hosts can reach: it must not be served without CURVE."""
    return is_tcp(endpoint) and not is_loopback(endpoint)


def _curve(config: Any) -> Any:
    return getattr(config, "curve", None)


def uses_curve_server(config: Any, endpoint: str) -> bool:
    """Whether a server socket bound to ``endpoint`` is a CURVE server under ``config``."""
    curve = _curve(config)
    return is_tcp(endpoint) and curve is not None and curve.server_secret_key is not None


def uses_curve_client(config: Any, endpoint: str) -> bool:
    """Whether a client socket connecting to ``endpoint`` is a CURVE client under ``config``."""
    curve = _curve(config)
    return is_tcp(endpoint) and curve is not None and curve.server_public_key is not None


# -- key files --------------------------------------------------------------------------------


def _error(config: Any, key: str, message: str, hint: str) -> ConfigError:
    return ConfigError(message, key=key, file=getattr(config, "path", None), hint=hint)


def _load_cert(config: Any, key: str, path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """Read a zmq.auth certificate; ConfigError naming the config key on any problem."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _error(config, key, f"cannot read certificate {path}: {exc.strerror or exc}",
                     "create one with `lmshard keys new NAME` and name it here") from None
    if not stat.S_ISREG(st.st_mode):
        raise _error(config, key, f"{path} is not a regular file", "name a certificate file")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise _error(config, key, f"{path} is not a zmq certificate: {exc}",
                     "use files written by `lmshard keys new NAME`") from None
    for what, k in (("public", public), ("secret", secret_key)):
        if k is not None and len(k) != 40:
            raise _error(config, key, f"{path}: the {what} key is not 40 Z85 characters",
                         "use files written by `lmshard keys new NAME`")
    if secret and secret_key is None:
        raise _error(config, key, f"{path} holds no secret key (is it the public .key file?)",
                     "name the NAME.key_secret file")
    if secret_key is not None and st.st_mode & 0o077:
        raise _error(
            config, key,
            f"secret certificate {path} is readable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod 600 {path}; anyone who read it can impersonate its owner, so consider "
            "making a new key pair",
        )
    return public, secret_key


def _check_allow_dir(config: Any, path: Path) -> None:
    key = "curve.allowed_client_keys"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _error(config, key, f"cannot read directory {path}: {exc.strerror or exc}",
                     "create it and copy the clients' NAME.key files into it") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _error(config, key, f"{path} is not a directory",
                     "name the directory that holds the allowed clients' NAME.key files")
    if st.st_mode & 0o022:
        raise _error(
            config, key,
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): anyone "
            "who can write there can let themselves in",
            f"chmod go-w {path}",
        )
    if not glob.glob(os.path.join(path, KEY_FILE_GLOB)):
        log.warning("%s holds no %s files: every CURVE client will be refused", path,
                    KEY_FILE_GLOB)


def public_key_of(config: Any) -> str | None:
    """This client's CURVE public key (Z85), or None when the config names no client key."""
    curve = _curve(config)
    if curve is None or curve.client_secret_key is None:
        return None
    try:
        public, _ = zmq.auth.load_certificate(curve.client_secret_key)
    except (OSError, ValueError):
        return None
    return public.decode("ascii", "replace")


# -- the ZAP handler --------------------------------------------------------------------------


def _watch_handshakes(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Log handshakes that fail before ZAP is asked, from a monitor of ``sock``."""
    events = zmq.EVENT_MONITOR_STOPPED
    for e in _HANDSHAKE_EVENTS:
        events |= e
    mon = sock.get_monitor_socket(events)

    def run() -> None:
        from zmq.utils.monitor import recv_monitor_message  # asyncio with it: servers only

        last = 0.0
        suppressed = 0
        try:
            while True:
                try:
                    ev = recv_monitor_message(mon)
                except zmq.ZMQError:
                    return
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                now = time.monotonic()
                if now - last < REFUSAL_LOG_INTERVAL:
                    suppressed += 1
                    continue
                last = now
                more = f" ({suppressed} more not logged)" if suppressed else ""
                suppressed = 0
                log.warning("refused a client on %s: %s%s", endpoint,
                            _HANDSHAKE_EVENTS.get(int(ev["event"]), str(ev["event"])), more)
        finally:
            mon.close(linger=0)

    threading.Thread(target=run, name=f"lmshard-handshakes {endpoint}", daemon=True).start()


# -- the hooks ----------------------------------------------------------------------------------


def _check_run_dir(endpoint: str) -> None:
    directory = os.path.dirname(endpoint[len("ipc://"):])
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError:
        return  # bind reports the real problem
    if mode & 0o077:
        log.warning("%s has mode %04o: other local users can reach the ipc sockets in it; "
                    "chmod 700 %s", directory, mode, directory)


def secure_server(sock: zmq.Socket[Any], config: Any, endpoint: str) -> None:
    """Prepare a socket that will bind ``endpoint`` (owner, reader pool, monitor, backup).

    Raises ConfigError for a non-loopback tcp endpoint without ``[curve]`` server keys, and for
    unreadable or unsafe key files.
    """
    if endpoint.startswith("ipc://"):
        _check_run_dir(endpoint)
        return
    if not is_tcp(endpoint):
        return
    curve = _curve(config)
    if not uses_curve_server(config, endpoint):
        if not needs_curve(endpoint):
            return
        raise _error(
            config, "curve.server_secret_key",
            f"{endpoint} listens on a non-loopback address, so it must use CURVE, and the "
            "config has no curve.server_secret_key",
            "create keys with `lmshard keys new server` and `lmshard keys new CLIENT`, then set "
            "[curve] server_secret_key and allowed_client_keys (see docs/security.md); or use "
            "an ipc:// or 127.0.0.1 endpoint",
        )
    if curve.allowed_client_keys is None:
        raise _error(
            config, "curve.allowed_client_keys",
            f"{endpoint} uses CURVE and the config names no allowed_client_keys directory, so "
            "no client could be let in",
            "set [curve] allowed_client_keys to a directory of the clients' NAME.key files",
        )
    public, secret = _load_cert(config, "curve.server_secret_key", curve.server_secret_key,
                                secret=True)
    _check_allow_dir(config, curve.allowed_client_keys)
    from lmshard.zap import authenticator  # a server's part: clients never import it

    auth = authenticator(sock.context)
    sock.zap_domain = auth.domain_for(curve.allowed_client_keys).encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    _watch_handshakes(sock, endpoint)


def secure_client(sock: zmq.Socket[Any], config: Any, endpoint: str) -> None:
    """Prepare a socket that will connect to ``endpoint``.

    Raises ConfigError for a non-loopback tcp endpoint without ``[curve]`` client keys.
    """
    if not is_tcp(endpoint):
        return
    curve = _curve(config)
    if not uses_curve_client(config, endpoint):
        if not needs_curve(endpoint):
            return
        raise _error(
            config, "curve.server_public_key",
            f"{endpoint} is on another host, so it is served with CURVE, and the config has "
            "no curve.server_public_key to connect with",
            "set [curve] server_public_key (the servers' NAME.key) and client_secret_key (this "
            "client's NAME.key_secret from `lmshard keys new NAME`); see docs/security.md",
        )
    if curve.client_secret_key is None:
        raise _error(
            config, "curve.client_secret_key",
            f"{endpoint} uses CURVE and the config names no client_secret_key",
            "create one with `lmshard keys new NAME`, set client_secret_key to "
            "NAME.key_secret and add NAME.key to the servers' allowed_client_keys",
        )
    server_public, _ = _load_cert(config, "curve.server_public_key", curve.server_public_key,
                                  secret=False)
    public, secret = _load_cert(config, "curve.client_secret_key", curve.client_secret_key,
                                secret=True)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def auth_hint(config: Any, endpoint: str) -> str:
    """What a client's timeout error should add for ``endpoint``: CURVE refusals are silent,
    so a client that is not allowed in sees nothing but a timeout."""
    if not uses_curve_client(config, endpoint):
        return ""
    key = public_key_of(config)
    curve = _curve(config)
    return (
        f"; CURVE authentication may have failed: the servers must list this client's public "
        f"key {key or '(unreadable)'} (curve.client_secret_key = {curve.client_secret_key}) "
        "as a NAME.key file in their allowed_client_keys directory, and "
        f"curve.server_public_key ({curve.server_public_key}) must be the servers' key; "
        "the server's log names every refused key"
    )
