"""``lmshard failover`` and ``lmshard copies``: make a replica the owner of a shard, and show
every copy of every shard (see docs/replicas.md).

    lmshard failover --shard N --to REPLICA [-c CONFIG] [--force]
    lmshard copies [-c CONFIG] [--json]

``failover`` asks every copy of shard N for its role (PING), checks that REPLICA is a replica
of the shard that answers, and sends it PROMOTE: it stops following, takes the next epoch and
serves the shard at its own endpoints. While another copy still answers as primary, failover
refuses (two owners would take writes) unless ``--force``, and says how far that copy is ahead.
Exit status: 0 promoted, 1 refused or failed, 2 bad usage or config.

``copies`` prints each copy's role, epoch, applied txn and lag (``lmshard status`` shows the
same under its processes when replica.names is set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import zmq

from lmshard import protocol, security
from lmshard.config import Config, load_config
from lmshard.copies import ping_copies, primary_of
from lmshard.errors import Error, error_from_wire
from lmshard.members import HOME
from lmshard.ops.command import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_option, say

PROMOTE_TIMEOUT = 30.0
"""Seconds ``failover`` waits for the promoted replica to answer that it serves."""


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"lmshard: {message}", file=sys.stderr)
    return status


def copies_status(config: Config) -> list[dict[str, Any]]:
    """Every copy of every shard with what it answers to PING (``health`` None and ``error``
    when it does not answer)."""
    out = []
    for shard in range(config.shards):
        for name, a in ping_copies(config, shard).items():
            out.append({"shard": shard, "member": name, "endpoint": a.endpoint,
                        "role": a.role, "epoch": a.epoch if a.health else None,
                        "health": a.health, "error": a.error})
    return out


def copy_line(c: dict[str, Any]) -> str:
    """One copy as ``lmshard status`` and ``lmshard copies`` print it."""
    head = f"shard {c['shard']:<3} {c['member']:<12}"
    h = c["health"]
    if h is None:
        return f"{head} DOWN      {c['error']}"
    if c["role"] == "primary":
        return f"{head} primary   epoch {c['epoch']}  txn {h.get('txn_id', '-')}"
    lag = f"lag {h['lag_txns']} txns, {h['lag_seconds']:.1f}s" if h["lag_txns"] else "caught up"
    return (f"{head} replica   epoch {c['epoch']}  of {h['primary']}  applied "
            f"{h['applied']}  {lag}  ({h['state']})")


def cmd_copies(args: argparse.Namespace) -> int:
    """``lmshard copies``: every copy of every shard; exit 1 when one does not answer."""
    config = load_config(args.config)
    copies = copies_status(config)
    if args.json:
        say(json.dumps(copies, indent=2, sort_keys=True))
    else:
        for c in copies:
            say(copy_line(c))
    return EXIT_OK if all(c["health"] is not None for c in copies) else EXIT_FAILED


def cmd_failover(args: argparse.Namespace) -> int:
    """``lmshard failover --shard N --to R``: promote replica R of shard N."""
    config = load_config(args.config)
    shard, name = args.shard, args.to
    if not 0 <= shard < config.shards:
        return _fail(f"--shard {shard} is not in 0..{config.shards - 1} (config {config.path})",
                     EXIT_USAGE)
    if name not in (HOME, *config.replica_names):
        return _fail(f"--to {name!r} is not one of replica.names {list(config.replica_names)} "
                     f"(or {HOME!r}, the shard's own copy, once it is a replica) "
                     f"(config {config.path})", EXIT_USAGE)
    answers = ping_copies(config, shard, timeout=args.timeout)
    target = answers[name]
    if target.health is None:
        return _fail(f"{name}'s copy of shard {shard} does not answer ({target.error}); is "
                     f"`lmshardd replica --shard {shard} --name {name}` running on its host?")
    if target.role != "replica":
        return _fail(f"{name}'s copy of shard {shard} is not a replica: it is {target.role} "
                     f"at epoch {target.epoch}; nothing to do")
    applied = target.health["applied"]
    primary = primary_of(answers, exclude=name)
    if primary is not None and primary.health is not None:
        ahead = max(0, int(primary.health.get("txn_id", 0)) - applied)
        text = (f"{primary.member} still answers as shard {shard}'s primary at epoch "
                f"{primary.epoch}, {ahead} txns ahead of {name} (applied {applied})")
        if not args.force:
            return _fail(f"{text}. Stop it first (on its host: lmshard ctl stop "
                         f"lmshard:shard_{shard:02d}), or pass --force to promote {name} "
                         "anyway (the writes it did not apply are not on the new primary)")
        print(f"lmshard: warning: {text}; promoting anyway (--force)", file=sys.stderr)
    if target.health.get("state") != "following":
        print(f"lmshard: warning: {name} is {target.health.get('state')}, not following",
              file=sys.stderr)
    try:
        reply = promote(config, target.endpoint, PROMOTE_TIMEOUT)
    except Error as exc:
        return _fail(f"{name} did not take over shard {shard}: {exc.message}"
                     + (f" ({exc.hint})" if exc.hint else ""))
    say(f"shard {shard}: {name} is the primary at epoch {reply['epoch']}; it had applied txn "
        f"{reply['applied']} of the old primary"
        + (f" ({reply['lag_txns']} txns it knew of were not applied)" if reply["lag_txns"]
           else ""))
    say(f"clients find {name} by themselves; watchers of shard {shard} start again "
        "(its change log is a new history); bring the old primary back and it rejoins as a "
        "replica")
    return EXIT_OK


def promote(config: Config, endpoint: str, timeout: float) -> dict[str, Any]:
    """Send PROMOTE to the copy at ``endpoint``; its answer (raised as the error it sends)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        security.secure_client(sock, config, endpoint)
        sock.connect(endpoint)
        sock.send(protocol.PROMOTE.frame(None, 1))
        deadline = time.monotonic() + timeout
        while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            _seq, status, body = protocol.unpack_frame(sock.recv())
            if status != 0:
                raise error_from_wire(status, *body)
            result: dict[str, Any] = body
            return result
        raise Error(f"no answer to PROMOTE within {timeout:g} s",
                    hint="see the replica's log; `lmshard copies` shows what each copy is now")
    finally:
        sock.close()


def add_parsers(subparsers: Any) -> None:
    """Register ``failover`` and ``copies`` on the ``lmshard`` CLI."""
    p = subparsers.add_parser(
        "failover", parents=[config_option()], help="make a replica the owner of a shard",
        description="Promote replica --to of shard --shard: it takes the next epoch and serves "
        "the shard at its own endpoints. Refuses while another copy answers as primary, "
        "unless --force.")
    p.add_argument("--shard", type=int, required=True, help="shard number, from 0")
    p.add_argument("--to", required=True, metavar="REPLICA",
                   help=f"one of replica.names, or {HOME} (the shard's own copy, when it "
                   "rejoined as a replica after an earlier failover)")
    p.add_argument("--force", action="store_true",
                   help="promote even though the current primary still answers")
    p.add_argument("--timeout", type=float, default=1.0,
                   help="seconds each copy has to answer the role check (default 1)")
    p.set_defaults(func=cmd_failover)

    p = subparsers.add_parser("copies", parents=[config_option()],
                              help="every copy of every shard: role, epoch, applied txn, lag")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_copies)
