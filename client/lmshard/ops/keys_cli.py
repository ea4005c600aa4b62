"""``lmshard keys new NAME [--dir D]``: make a CURVE key pair for a server or a client.

Writes ``D/NAME.key`` (the public certificate, mode 0644: hand it out) and
``D/NAME.key_secret`` (the secret certificate, mode 0600: it never leaves the host that uses
it), in pyzmq's ``zmq.auth`` certificate format. The directory is created with mode 0700 when
it does not exist. See docs/security.md for where each file goes.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import zmq.auth

from lmshard.config import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Key pair names: a letter or digit, then letters, digits, ``_ . -``; 64 characters at most."""
DEFAULT_DIR = "."
"""Where ``keys new`` writes without ``--dir``: the current directory."""


def new_key_pair(name: str, directory: str | os.PathLike[str] = DEFAULT_DIR, *,
                 force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into ``directory``; their paths (public, secret).

    The secret file is created with mode 0600 from the start (never readable by others, not
    even briefly). Raises ConfigError for a bad name or an existing pair without ``force``.
    """
    if not NAME_RE.fullmatch(name) or name.endswith((".key", ".key_secret")):
        raise ConfigError(
            f"bad key name {name!r}: expected a letter or digit, then letters, digits, '_', "
            "'.' or '-' (at most 64), without the .key suffix",
            hint="e.g. `lmshard keys new server` or `lmshard keys new web-01`")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} is not a directory", hint="pass --dir DIRECTORY")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(map(str, existing))} already exist(s)",
            hint="pick another name, or pass --force to replace the pair (clients and servers "
            "that use the old one are locked out)")
    for p in existing:
        p.unlink()
    old = os.umask(0o077)
    try:
        made_public, made_secret = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(made_public, 0o644)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def cmd_keys_new(args: argparse.Namespace) -> int:
    """``lmshard keys new``: write the pair and say where each file goes."""
    public, secret = new_key_pair(args.name, args.dir, force=args.force)
    key, _ = zmq.auth.load_certificate(public)
    print(f"public certificate: {public}  (key {key.decode()})")
    print(f"secret certificate: {secret}  (mode 0600; keep it on this host)")
    print("A server: set [curve] server_secret_key to the secret file on the servers' host and "
          "server_public_key to the public file on every client host.")
    print("A client: set [curve] client_secret_key to the secret file on the client's host and "
          "copy the public file into the servers' allowed_client_keys directory.")
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register ``keys new NAME [--dir D] [--force]`` on the ``lmshard`` CLI's subparsers."""
    keys = subparsers.add_parser("keys", help="make CURVE key pairs (tcp endpoints between "
                                 "hosts need them)")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    p = sub.add_parser("new", help="write NAME.key (public) and NAME.key_secret (secret, 0600)")
    p.add_argument("name", metavar="NAME", help="name of the pair, e.g. server or web-01")
    p.add_argument("--dir", default=DEFAULT_DIR, metavar="D",
                   help="directory to write to (default: the current directory; created with "
                   "mode 0700)")
    p.add_argument("--force", action="store_true", help="replace an existing pair")
    p.set_defaults(func=cmd_keys_new)
