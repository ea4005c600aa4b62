"""Endpoint and address syntax: ``ipc:///abs/path.sock`` and ``tcp://host:port`` patterns, the
monitor's ``HOST:PORT``, the one loopback check, and where reader I of a pool listens.

An endpoint in the config is a pattern: ``{run_dir}``, ``{shard}`` and ``{port}`` are filled in
(``expand_endpoint``), then the result is checked (``check_endpoint``). Servers bind and
clients connect to the same string, so a tcp endpoint must name a concrete host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path, PurePosixPath

from lmshard.config.errors import ConfigError

IPC_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
"""Longest path a unix socket address can hold (``sun_path`` minus the terminating NUL)."""
DEFAULT_MONITOR_HTTP = "127.0.0.1:9464"
"""Where the monitor serves /metrics and /stats (9464: a port commonly used by exporters)."""

_EXPECTED = 'expected "ipc:///absolute/path.sock" or "tcp://host:port"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def split_host_port(address: str) -> tuple[str, str]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port text); port ``""`` when missing."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
        return host, port
    host, sep, port = address.rpartition(":")
    return (host, port) if sep else (address, "")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_http(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> (host, port); port 0 picks a free one.
    ValueError naming what was expected if malformed."""
    host, port = split_host_port(text)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"got {text!r}; expected HOST:PORT, e.g. {DEFAULT_MONITOR_HTTP!r}, "
                         'or "off"')
    return host, int(port)


def format_http(address: tuple[str, int] | None) -> str:
    """The inverse of ``parse_http`` (``"off"`` for None)."""
    if address is None:
        return "off"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def escape_braces(text: str) -> str:
    """A literal endpoint written as a pattern that expands to itself (``{`` -> ``{{``)."""
    return text.replace("{", "{{").replace("}", "}}")


def expand_endpoint(template: str, *, key: str, file: Path | None, run_dir: Path,
                    port_key: str | None = None, **fields: int | str) -> str:
    """Substitute ``{run_dir}`` and ``fields`` (``{shard}``, ``{port}``) in ``template`` and
    check the result; ConfigError on ``key`` otherwise. ``port_key`` names the key that gives
    ``{port}``, for the message when it is not set."""
    try:
        endpoint = template.format(run_dir=str(run_dir), **fields)
    except KeyError as exc:
        name = exc.args[0]
        if name == "port" and port_key is not None:
            problem = f"uses {{port}} but {port_key} is not set; expected {port_key} = <port>"
        else:
            known = ", ".join("{" + k + "}" for k in ("run_dir", *fields))
            problem = f"has an unknown placeholder {{{name}}}; expected only {known}"
        raise ConfigError(f"{template!r} {problem}", key=key, file=file) from exc
    except (ValueError, IndexError) as exc:
        raise ConfigError(
            f"bad placeholder in {template!r} ({exc}); expected {{run_dir}}, {{shard}} or "
            "{port}, optionally with a format spec like {shard:02d}; write a literal brace "
            "as {{ or }}",
            key=key, file=file,
        ) from exc
    check_endpoint(endpoint, key=key, file=file, run_dir=run_dir)
    return endpoint


def check_endpoint(endpoint: str, *, key: str, file: Path | None, run_dir: Path) -> None:
    """ConfigError on ``key`` unless ``endpoint`` is an absolute ipc path that fits a unix
    socket address, or tcp to a concrete host and a port from 1 to 65535."""
    if endpoint.startswith("ipc://"):
        _check_ipc(endpoint, key=key, file=file, run_dir=run_dir)
    elif endpoint.startswith("tcp://"):
        _check_tcp(endpoint, key=key, file=file)
    else:
        raise ConfigError(f"got {endpoint!r}; {_EXPECTED} (only ipc and tcp are supported)",
                          key=key, file=file)


def _check_ipc(endpoint: str, *, key: str, file: Path | None, run_dir: Path) -> None:
    path = endpoint[len("ipc://"):]
    if not path.startswith("/"):
        raise ConfigError(
            f"{endpoint!r} has a relative ipc path; {_EXPECTED}", key=key, file=file,
            hint='start the path with {run_dir}, e.g. "ipc://{run_dir}/name.sock"',
        )
    length = len(os.fsencode(path))
    if length > IPC_PATH_MAX:
        raise ConfigError(
            f"ipc path {path!r} is {length} bytes, longer than the unix socket limit; "
            f"expected at most {IPC_PATH_MAX} bytes", key=key, file=file,
            hint=f"use a shorter run_dir (now {run_dir}), e.g. /run/lmshard or /tmp/lmshard",
        )


def _check_tcp(endpoint: str, *, key: str, file: Path | None) -> None:
    host, port = split_host_port(endpoint[len("tcp://"):])
    if host in ("*", "", "0.0.0.0", "::", "[::]") or host.startswith("*"):
        raise ConfigError(
            f"{endpoint!r} has no concrete host; {_EXPECTED} (clients connect to the same "
            "endpoint the server binds, so name the address, e.g. tcp://10.0.0.5:5500)",
            key=key, file=file,
        )
    if not _is_host(host):
        raise ConfigError(f"{endpoint!r} has an invalid host {host!r}; {_EXPECTED}",
                          key=key, file=file)
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"{endpoint!r} has port {port!r}; expected a port number from 1 to "
                          "65535", key=key, file=file)


def _is_host(host: str) -> bool:
    if _HOSTNAME_RE.fullmatch(host) is not None:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def derive_reader_endpoint(base: str, index: int) -> str:
    """Reader ``index``'s endpoint in a pool whose ``readers.endpoint`` is ``base``: ``base``
    for reader 0, then the port plus ``index`` (tcp) or ``-<index>`` before the file suffix
    (ipc): ``ipc:///run/readers.sock`` -> ``ipc:///run/readers-1.sock``."""
    if index == 0:
        return base
    if base.startswith("tcp://"):
        host, port = split_host_port(base[len("tcp://"):])
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{int(port) + index}"
    path = PurePosixPath(base[len("ipc://"):])
    return f"ipc://{path.with_name(f'{path.stem}-{index}{path.suffix}')}"
