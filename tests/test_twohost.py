"""Two hosts: shard owners and the reader pool in one network namespace, a client in another.

The namespaces are joined by a veth pair with addresses in 10.201.N.0/24 that exist only inside
them, so the only traffic is between the two "hosts", over tcp with CURVE. Needs root (we run
as root here and in CI); skipped otherwise.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lmshard.config import CurveConfig, make_config
from lmshard.ops.keys_cli import new_key_pair
from tests.cluster import REPO, env_for_children

SHARDS = 2
READERS = 2


CLIENT = textwrap.dedent("""
    import json, sys, time
    import lmshard
    from lmshard.config import load_config
    from lmshard.errors import ShardUnavailable
    from lmshard.protocol import COUNT, GET, GET_MANY, LOOKUP
    from lmshard.remote import ReaderPool

    cfg, rogue = load_config(sys.argv[1]), load_config(sys.argv[2])
    out = {}
    with lmshard.connect(cfg, local_reads=False, timeout_ms=500, retries=0) as c, \\
            ReaderPool(cfg, timeout_ms=500, retries=0) as pool:
        deadline = time.monotonic() + 60
        while True:  # the servers on the other host are still starting
            try:
                for s in range(cfg.shards):
                    c.ping(s)
                health = pool.ping_each(500).values()
                if all(h is not None and len(h["txn_ids"]) == cfg.shards for h in health):
                    break
            except ShardUnavailable:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("servers not ready")
            time.sleep(0.1)
    with lmshard.connect(cfg, local_reads=False) as c, ReaderPool(cfg) as pool:
        watch = c.watch("blobs")  # the change feed, over tcp with CURVE too
        with c.batch() as b:
            for i in range(300):
                b.put("blobs", i, b"v%d" % i)
            for i in range(30):
                b.put("items", i, {"group": "g%d" % (i % 3), "n": i})
        out["incr"] = c.incr("counters", "hits", 5)
        out["owner_get"] = c.get("blobs", 7).decode()
        ct, it = c.table("blobs"), c.table("items")
        kb = ct.kenc(42)
        out["get"] = pool.request(c.slot_map.shard_of(kb), *GET.request_for(ct.tid, kb)).decode()
        by = {}
        for i in range(300):
            by.setdefault(c.slot_map.shard_of(ct.kenc(i)), []).append(ct.kenc(i))
        got = pool.requests([(s, *GET_MANY.request_for(ct.tid, ks)) for s, ks in by.items()])
        out["get_many"] = sum(v is not None for vs in got for v in vs)
        out["scan"] = sorted(ct.kdec(k) for s in range(cfg.shards) for k, _ in
                             pool.scan(s, ct.tid, page=64))
        out["count"] = sum(pool.request(s, *COUNT.request_for(ct.tid, None, None))
                           for s in range(cfg.shards))
        from lmshard.index_values import encode_index_value
        out["lookup"] = sorted(it.kdec(k) for s in range(cfg.shards) for k, _ in
                               pool.request(s, *LOOKUP.request_for(
                                   it.tid, "by_group", encode_index_value("g1"), False)))
        out["readers"] = sorted(h["reader"] for h in pool.ping_each().values() if h)
        seen = []
        while len(seen) < 300 and (ch := watch.get(10)) is not None:
            seen.append(ch.key)
        out["watched"] = sorted(seen)
        watch.close()
    try:
        ReaderPool(rogue, timeout_ms=300, retries=1).request(
            0, *COUNT.request_for(ct.tid, None, None))
        out["rogue_pool"] = "answered"
    except ShardUnavailable as exc:
        out["rogue_pool"] = str(exc)
    try:
        lmshard.connect(rogue, timeout_ms=300, retries=0).put("blobs", 1, b"x")
        out["rogue_owner"] = "answered"
    except ShardUnavailable as exc:
        out["rogue_owner"] = str(exc)
    try:
        lmshard.connect(rogue, timeout_ms=300, retries=0).watch()
        out["rogue_watch"] = "answered"
    except ShardUnavailable as exc:
        out["rogue_watch"] = str(exc)
    print(json.dumps(out))
""")


def test_writes_and_remote_reads_across_hosts_with_curve(
        two_hosts: tuple[str, str, str, str], tmp_path: Path) -> None:
    ns_a, addr_a, ns_b, addr_b = two_hosts
    keys = tmp_path / "keys"
    server_pub, server_sec = new_key_pair("server", keys)
    client_pub, client_sec = new_key_pair("client", keys)
    rogue_pub, rogue_sec = new_key_pair("rogue", keys)
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    shutil.copy(client_pub, allowed / "client.key")

    def config(client_secret: Path, name: str) -> Path:
        cfg = make_config(
            base_dir=tmp_path, shards=SHARDS, readers=READERS, schema="tests.schemas:schema",
            python_path=[str(REPO)], data_dir=str(tmp_path / "data"),
            run_dir=str(tmp_path / "run"), sync=False,
            endpoints=f"tcp://{addr_a}:{{port}}", base_port=15500,
            stat_endpoints=f"tcp://{addr_a}:{{port}}", stat_base_port=15600,
            backup_endpoints=f"tcp://{addr_a}:{{port}}", backup_base_port=15700,
            changes_endpoints=f"tcp://{addr_a}:{{port}}", changes_base_port=15400,
            reader_endpoint=f"tcp://{addr_a}:15800", monitor_endpoint=f"tcp://{addr_a}:15900",
            curve=CurveConfig(server_secret_key=server_sec, server_public_key=server_pub,
                              client_secret_key=client_secret, allowed_client_keys=allowed))
        path = tmp_path / name
        path.write_text(cfg.to_toml())
        return path

    cfg_path = config(client_sec, "lmshard.toml")
    rogue_path = config(rogue_sec, "rogue.toml")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = env_for_children()
    logs: dict[str, Path] = {}
    procs: list[subprocess.Popen[bytes]] = []

    def on_host_a(name: str, *args: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns_a, sys.executable, "-m", "lmshardd.main", "-c",
             str(cfg_path), *args], stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT,
            cwd=REPO, env=env))

    try:
        for s in range(SHARDS):
            on_host_a(f"owner-{s}", "owner", "--shard", str(s))
        for i in range(READERS):
            on_host_a(f"reader-{i}", "readers", "--index", str(i))
        client = subprocess.run(
            ["ip", "netns", "exec", ns_b, sys.executable, str(script), str(cfg_path),
             str(rogue_path)], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        server_logs = {n: p.read_text(errors="replace") for n, p in logs.items()}
        assert client.returncode == 0, (client.stderr[-3000:], server_logs)
        out = json.loads(client.stdout.strip().splitlines()[-1])
        assert out["incr"] == 5 and out["owner_get"] == "v7" and out["get"] == "v42"
        assert out["get_many"] == 300 and out["count"] == 300
        assert out["scan"] == list(range(300))
        assert out["lookup"] == [i for i in range(30) if i % 3 == 1]
        assert out["readers"] == list(range(READERS))
        assert out["watched"] == list(range(300))
        assert "did not answer the watch" in out["rogue_watch"]
        rogue_key = rogue_pub.read_text().split('public-key = "')[1].split('"')[0]
        assert "CURVE authentication may have failed" in out["rogue_pool"]
        assert rogue_key in out["rogue_pool"]
        assert out["rogue_owner"].startswith(f"shard 0 at tcp://{addr_a}:15500 did not answer")
        # Both kinds of server logged the refusal, with the rogue's address and key.
        deadline = time.monotonic() + 5
        while True:
            server_logs = {n: p.read_text(errors="replace") for n, p in logs.items()}
            refused = [n for n, text in server_logs.items()
                       if f"refused CURVE client at {addr_b}" in text and rogue_key in text]
            if "owner-0" in refused and any(n.startswith("reader") for n in refused):
                break
            assert time.monotonic() < deadline, server_logs
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), {
        n: p.read_text(errors="replace")[-1500:] for n, p in logs.items()}
