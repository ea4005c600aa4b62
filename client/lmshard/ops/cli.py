"""``lmshard``: set up, start, stop and inspect an lmshard service run by supervisord.

    lmshard init DIR [--shards N] [--readers M] [--schema module:attr] [--python-path P]
    lmshard supervisord-conf [-c CONFIG]     (re)write supervisord.conf next to the config
    lmshard up [-c CONFIG] [--foreground]    start supervisord, wait until every shard answers
    lmshard down [-c CONFIG]                 stop supervisord and everything it runs
    lmshard status [-c CONFIG] [--json]      processes and shard health
    lmshard ctl [-c CONFIG] ARGS...          supervisorctl on this service's supervisord
    lmshard demo [-c CONFIG] [--workers N] [--seconds S]

and ``stats``, ``top``, ``watch``, ``backup``, ``verify``, ``restore``, ``keys``,
``bench``, ``failover``, ``copies`` and ``reshard``. Each command lives in a module of
``lmshard.ops`` that registers it with ``add_parsers``; this one puts them together and turns
errors into exit statuses.

Every command finds the config by ``-c``, then ``$LMSHARD_CONFIG``, then
``./config/lmshard.toml``; supervisord.conf is the file next to it. Exit status: 0 ok,
1 failed, 2 bad usage or config, 3 (status) not running, 4 (watch) the cursor is older
than the change logs keep.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from lmshard.config import ConfigError
from lmshard.errors import Error
from lmshard.ops import (
    backup_cli,
    bench_cli,
    demo,
    keys_cli,
    replica_cli,
    reshard_cli,
    service_cli,
    status,
    top,
    watch_cli,
)
from lmshard.ops.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from lmshard.ops.supervise import SupervisorError

COMMAND_MODULES: tuple[ModuleType, ...] = (
    service_cli, status, demo, top, watch_cli, backup_cli, keys_cli, bench_cli, replica_cli,
    reshard_cli,
)
"""The modules of the ``lmshard`` commands, in the order ``lmshard --help`` lists them; each
registers its commands with ``add_parsers(subparsers)`` and sets ``func``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``lmshard`` argument parser with every command."""
    ap = argparse.ArgumentParser(
        prog="lmshard", description="Set up, run and inspect an lmshard service (supervisord).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one ``lmshard`` command; its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (Error, SupervisorError) as exc:
        print(f"lmshard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("lmshard: interrupted (`lmshard status` shows what runs)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lmshard status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
