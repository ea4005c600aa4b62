#!/usr/bin/env python3
"""A supervisord eventlistener that reports shard owners that crash or cannot start.

supervisord sends it PROCESS_STATE_EXITED and PROCESS_STATE_FATAL events (see the commented
``[eventlistener:lmshard_alerts]`` section of the generated supervisord.conf, or
``lmshard init --alerts``). For a shard owner (group ``lmshard``, process ``shard_NN``) that
exited unexpectedly or went FATAL it writes one line to stderr (supervisord logs it to the
listener's log file) and, if the environment variable ``LMSHARD_ALERT_COMMAND`` is set, runs
that command through the shell with these variables set:

    LMSHARD_EVENT     PROCESS_STATE_EXITED or PROCESS_STATE_FATAL
    LMSHARD_PROCESS   group:name, e.g. lmshard:shard_01
    LMSHARD_PID       the pid that exited ("" for FATAL)
    LMSHARD_MESSAGE   the line written to stderr

e.g. ``LMSHARD_ALERT_COMMAND='logger -t lmshard "$LMSHARD_MESSAGE"'``. Only the standard library
is used, so any Python 3 runs it.

The protocol (supervisor's "Event Listener Notification Protocol"): write ``READY\\n`` to stdout,
read one header line (``key:value`` pairs, ``len`` is the payload length), read exactly ``len``
bytes of payload, answer ``RESULT 2\\nOK`` and start over. Nothing else may go to stdout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GROUP = "lmshard"
"""The supervisord group whose shard owners this listener watches."""
ALERT_COMMAND_ENV = "LMSHARD_ALERT_COMMAND"
ALERT_TIMEOUT = 30.0
"""Seconds an alert command may run before it is killed; supervisord waits for our RESULT."""


def parse_tokens(line: str) -> dict[str, str]:
    """``"a:1 b:2"`` -> ``{"a": "1", "b": "2"}`` (header lines and payload first lines)."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def describe(event: str, payload: dict[str, str]) -> str | None:
    """The alert line for this event, or None if it is not about a crashed shard owner."""
    group, name = payload.get("groupname", ""), payload.get("processname", "")
    if group != GROUP or not name.startswith("shard_"):
        return None
    process = f"{group}:{name}"
    if event == "PROCESS_STATE_EXITED":
        if payload.get("expected") == "1":
            return None  # exited with an expected exit code: not a crash
        return (f"lmshard alert: {process} (pid {payload.get('pid', '?')}) exited unexpectedly "
                f"from state {payload.get('from_state', '?')}; supervisord restarts it")
    if event == "PROCESS_STATE_FATAL":
        return (f"lmshard alert: {process} is FATAL: it could not be started (from state "
                f"{payload.get('from_state', '?')}); see its log, then "
                f"`lmshard ctl start {process}`")
    return None


def alert(event: str, payload: dict[str, str], message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)
    command = os.environ.get(ALERT_COMMAND_ENV)
    if not command:
        return
    env = dict(os.environ)
    env.update(
        LMSHARD_EVENT=event,
        LMSHARD_PROCESS=f"{payload.get('groupname', '')}:{payload.get('processname', '')}",
        LMSHARD_PID=payload.get("pid", ""),
        LMSHARD_MESSAGE=message,
    )
    try:
        # stdout is the protocol channel: the command's output goes to our stderr.
        done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                              stdout=sys.stderr, stderr=sys.stderr, timeout=ALERT_TIMEOUT)
        if done.returncode != 0:
            print(f"{stamp} alert command exited {done.returncode}", file=sys.stderr, flush=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"{stamp} alert command failed: {exc}", file=sys.stderr, flush=True)


def main() -> int:
    # `supervisorctl signal HUP ...` must not kill the listener (SIGHUP's default action): it
    # has no config or log file to re-read, so HUP means nothing to it. A handler that does
    # nothing rather than SIG_IGN, because an ignored signal stays ignored in the alert
    # commands it runs, while a handler is reset to the default there.
    signal.signal(signal.SIGHUP, lambda signum, frame: None)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return 0  # supervisord closed our stdin: it is shutting down
        headers = parse_tokens(line.decode())
        body = stdin.read(int(headers.get("len", "0"))).decode()
        first, _, _data = body.partition("\n")
        event = headers.get("eventname", "")
        try:
            payload = parse_tokens(first)
            message = describe(event, payload)
            if message is not None:
                alert(event, payload, message)
        except Exception as exc:  # an alerting bug must not stall supervisord's event queue
            print(f"lmshard alerts: cannot handle {event}: {exc!r}", file=sys.stderr, flush=True)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
