"""``lmshardd``: the daemon's processes, each started by supervisord (one program per role)."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from lmshard.config import ConfigError, load_config
from lmshard.members import HOME
from lmshardd import monitor, readers

ROLES: tuple[tuple[str, ModuleType, str], ...] = (
    ("readers", readers, "serve remote reads from every shard (the reader pool)"),
    ("monitor", monitor, "collect every shard's stats; serve Prometheus /metrics"),
)
"""Roles besides ``owner``: each module provides add_arguments(parser) and run(config, args)."""


def main(argv: list[str] | None = None) -> int:
    """Run one daemon process in the role named on the command line; its exit status."""
    ap = argparse.ArgumentParser(prog="lmshardd", description="lmshard daemon processes")
    ap.add_argument("-c", "--config", help="config file (default: $LMSHARD_CONFIG or "
                    "config/lmshard.toml)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="role", required=True)
    owner = sub.add_parser("owner", help="own and serve one shard")
    owner.add_argument("--shard", type=int, required=True, help="shard number, from 0")
    replica = sub.add_parser("replica", help="keep a replica's copy of one shard (replica.names)")
    replica.add_argument("--shard", type=int, required=True, help="shard number, from 0")
    replica.add_argument("--name", required=True, help="the replica's name, one of replica.names")
    roles = {}
    for role, module, text in ROLES:
        roles[role] = module
        module.add_arguments(sub.add_parser(role, help=text))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"lmshardd: {exc}", file=sys.stderr)
        return 2
    if args.role in ("owner", "replica"):
        if not 0 <= args.shard < config.shards:
            print(f"lmshardd: --shard {args.shard} is not in 0..{config.shards - 1} "
                  f"(config {config.path})", file=sys.stderr)
            return 2
        if args.role == "replica" and args.name not in config.replica_names:
            print(f"lmshardd: --name {args.name!r} is not one of replica.names "
                  f"{list(config.replica_names)} (config {config.path})", file=sys.stderr)
            return 2
        if args.role == "owner" and not config.replica_names:
            from lmshardd.owner import run_owner

            return run_owner(config, args.shard)
        # With replicas, any copy's process first finds out whether it owns the shard.
        from lmshardd.replica import run_copy

        return run_copy(config, args.shard, HOME if args.role == "owner" else args.name)
    return int(roles[args.role].run(config, args))


if __name__ == "__main__":
    sys.exit(main())
