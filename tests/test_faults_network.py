"""A history across two hosts while the link between them is cut, and delayed and lossy where the
kernel has netem: owners and the reader pool in network namespace A (tcp + CURVE), the campaign's
clients in namespace B, reads through the reader pool. The checker must find no anomaly."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmshard.config import CurveConfig, make_config
from lmshard.ops.keys_cli import new_key_pair
from tests.cluster import REPO, env_for_children
from tests.faults import checker, final
from tests.faults.history import load

pytestmark = pytest.mark.slow

SECONDS = 15.0
"""The clients' load."""
WORKERS = 3
CUT_SECONDS = 1.5
"""A cut link stays down this long: longer than a client's timeout and retry."""


def _ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30)


def _netem(ns: str, dev: str) -> bool:
    """Delay and loss on ``dev`` for a while, if the kernel has netem; whether it did."""
    on = _ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "80ms", "40ms",
             "loss", "5%")
    if on.returncode != 0:
        return False
    time.sleep(2.0)
    _ns(ns, "tc", "qdisc", "del", "dev", dev, "root")
    return True


def test_a_history_across_hosts_with_the_link_cut(
        two_hosts: tuple[str, str, str, str], tmp_path: Path) -> None:
    ns_a, addr_a, ns_b, _addr_b = two_hosts
    dev_b = next(line.split(":")[1].strip().split("@")[0]
                 for line in _ns(ns_b, "ip", "-o", "link").stdout.splitlines()
                 if "lmvb" in line)
    keys = tmp_path / "keys"
    server_pub, server_sec = new_key_pair("server", keys)
    client_pub, client_sec = new_key_pair("client", keys)
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    shutil.copy(client_pub, allowed / "client.key")
    cfg = make_config(
        base_dir=tmp_path, shards=2, readers=2, schema="tests.faults.schema:schema",
        python_path=[str(REPO)], data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / "run"),
        local_reads=False, endpoints=f"tcp://{addr_a}:{{port}}", base_port=16500,
        stat_endpoints=f"tcp://{addr_a}:{{port}}", stat_base_port=16600,
        backup_endpoints=f"tcp://{addr_a}:{{port}}", backup_base_port=16700,
        reader_endpoint=f"tcp://{addr_a}:16800", monitor_endpoint=f"tcp://{addr_a}:16900",
        curve=CurveConfig(server_secret_key=server_sec, server_public_key=server_pub,
                          client_secret_key=client_sec, allowed_client_keys=allowed))
    toml = tmp_path / "lmshard.toml"
    toml.write_text(cfg.to_toml())
    env = env_for_children()
    procs: list[subprocess.Popen[bytes]] = []
    history = tmp_path / "history"
    history.mkdir()
    rng = random.Random()
    cuts = netems = 0
    try:
        for args in (("owner", "--shard", "0"), ("owner", "--shard", "1"),
                     ("readers", "--index", "0"), ("readers", "--index", "1")):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns_a, sys.executable, "-m", "lmshardd.main", "-c",
                 str(toml), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=REPO, env=env))
        time.sleep(2.0)  # owners bound; the clients' first requests would retry anyway
        clients = [subprocess.Popen(
            ["ip", "netns", "exec", ns_b, sys.executable, "-c",
             "import sys; from tests.faults.workload import run_worker; "
             "run_worker(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), "
             "int(sys.argv[5]))", str(toml), f"c{n}", str(history / f"c{n}.jsonl"),
             str(SECONDS), str(rng.randrange(2**32))], cwd=REPO, env=env)
            for n in range(WORKERS)]
        end = time.monotonic() + SECONDS - 2
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.5, 1.5))
            if rng.random() < 0.5 and _netem(ns_b, dev_b):
                netems += 1
                continue
            subprocess.run(["ip", "-n", ns_b, "link", "set", dev_b, "down"], check=True)
            time.sleep(CUT_SECONDS)
            subprocess.run(["ip", "-n", ns_b, "link", "set", dev_b, "up"], check=True)
            cuts += 1
        for c in clients:
            assert c.wait(120) == 0
        out = tmp_path / "final.json"
        done = _ns(ns_b, sys.executable, "-m", "tests.faults.final", str(toml), str(out))
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["ip", "-n", ns_b, "link", "set", dev_b, "up"], capture_output=True)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    ops = load(sorted(history.glob("*.jsonl")))
    last, totals, problems = final.load(out)
    result = checker.check(ops + last)
    anomalies = result.anomalies + problems
    for key, value in totals.items():
        anomalies += checker.check_counter(key, [op for op in ops if op.key == key], value)
    assert anomalies == []
    assert cuts >= 3, (cuts, netems)
    assert sum(op.outcome == "unknown" for op in ops) > 0  # the cuts did reach the clients
    assert sum(op.outcome == "ok" for op in ops) > 500
