"""Socket security: which endpoints need CURVE, key files, ZAP refusals, ``lmshard keys new``."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from lmshard import protocol, security, zap
from lmshard.config import ConfigError, CurveConfig, make_config
from lmshard.errors import ShardUnavailable
from lmshard.ops.keys_cli import add_parsers, new_key_pair
from lmshard.remote import ReaderPool
from tests.cluster import REPO
from tests.schemas import BLOBS_ID

BLOBS = uuid.UUID(BLOBS_ID).bytes


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server pair, an allowed client pair, a stranger's pair; the allow-list directory."""
    d = tmp_path / "keys"
    out: dict[str, Path] = {}
    for name in ("server", "client", "stranger"):
        out[name + ".key"], out[name + ".key_secret"] = new_key_pair(name, d)
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    (allowed / "client.key").write_bytes(out["client.key"].read_bytes())
    out["allowed"] = allowed
    return out


def _config(tmp_path: Path, keys: dict[str, Path], client: str = "client", **extra: Any) -> Any:
    curve = CurveConfig(
        server_secret_key=keys["server.key_secret"], server_public_key=keys["server.key"],
        client_secret_key=keys[f"{client}.key_secret"], allowed_client_keys=keys["allowed"])
    return make_config(base_dir=tmp_path, curve=curve, **extra)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield context
    finally:
        zap.stop_authenticator(context)
        # Not destroy(): it would close the handshake monitors' sockets under their threads
        # (libzmq aborts). Close the rest; term() ends the monitor threads, which close theirs.
        monitors = {id(m) for s in list(context._sockets)
                    if (m := getattr(s, "_monitor_socket", None)) is not None}
        for s in list(context._sockets):
            if id(s) not in monitors and not s.closed:
                s.close(linger=0)
        context.term()


# -- which endpoints need CURVE -----------------------------------------------------------------


def test_non_loopback_tcp_without_keys_is_a_config_error(tmp_path: Path,
                                                         ctx: zmq.Context[Any]) -> None:
    cfg = make_config(base_dir=tmp_path)
    sock = ctx.socket(zmq.ROUTER)
    with pytest.raises(ConfigError, match="tcp://10.0.0.5:5500 listens on a non-loopback "
                       "address, so it must use CURVE") as exc:
        security.secure_server(sock, cfg, "tcp://10.0.0.5:5500")
    assert exc.value.key == "curve.server_secret_key" and "lmshard keys new" in str(exc.value)
    for endpoint in ("tcp://db1.internal:5500", "tcp://[2001:db8::1]:5500", "tcp://0.0.0.0:1"):
        with pytest.raises(ConfigError):
            security.secure_server(sock, cfg, endpoint)
        with pytest.raises(ConfigError, match="curve.server_public_key"):
            security.secure_client(sock, cfg, endpoint)
    for endpoint in ("tcp://127.0.0.1:5500", "tcp://[::1]:5500", "tcp://localhost:5500",
                     f"ipc://{tmp_path}/x.sock"):
        security.secure_server(sock, cfg, endpoint)  # loopback and ipc: no CURVE needed
        security.secure_client(sock, cfg, endpoint)
    assert sock.curve_server == 0
    sock.close()


def test_curve_needs_an_allow_list_and_a_client_key(tmp_path: Path, keys: dict[str, Path],
                                                    ctx: zmq.Context[Any]) -> None:
    sock = ctx.socket(zmq.ROUTER)
    cfg = make_config(base_dir=tmp_path, curve=CurveConfig(
        server_secret_key=keys["server.key_secret"], server_public_key=keys["server.key"]))
    with pytest.raises(ConfigError, match="no allowed_client_keys"):
        security.secure_server(sock, cfg, "tcp://10.0.0.5:5500")
    with pytest.raises(ConfigError, match="no client_secret_key"):
        security.secure_client(sock, cfg, "tcp://10.0.0.5:5500")
    sock.close()


def test_unsafe_or_wrong_key_files_are_refused(tmp_path: Path, keys: dict[str, Path],
                                               ctx: zmq.Context[Any]) -> None:
    sock = ctx.socket(zmq.ROUTER)
    ep = "tcp://10.0.0.5:5500"
    os.chmod(keys["server.key_secret"], 0o644)
    with pytest.raises(ConfigError, match="readable by other users") as exc:
        security.secure_server(sock, _config(tmp_path, keys), ep)
    assert "chmod 600" in str(exc.value)
    os.chmod(keys["server.key_secret"], 0o600)
    os.chmod(keys["allowed"], 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        security.secure_server(sock, _config(tmp_path, keys), ep)
    os.chmod(keys["allowed"], 0o755)
    wrong = dict(keys, **{"server.key_secret": keys["server.key"]})
    with pytest.raises(ConfigError, match="holds no secret key"):
        security.secure_server(sock, _config(tmp_path, wrong), ep)
    missing = dict(keys, **{"server.key_secret": tmp_path / "nope"})
    with pytest.raises(ConfigError, match="cannot read certificate") as exc:
        security.secure_server(sock, _config(tmp_path, missing), ep)
    assert exc.value.key == "curve.server_secret_key"
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("hello\n")
    os.chmod(garbage, 0o600)
    with pytest.raises(ConfigError, match="not a zmq certificate"):
        security.secure_client(sock, _config(tmp_path, dict(keys, **{
            "client.key_secret": garbage})), ep)
    security.secure_server(sock, _config(tmp_path, keys), ep)
    assert sock.curve_server == 1
    sock.close()


# -- CURVE and ZAP on a live socket -------------------------------------------------------------


def _echo_server(ctx: zmq.Context[Any], cfg: Any) -> tuple[zmq.Socket[bytes], str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_server(sock, cfg, "tcp://127.0.0.1:1")  # loopback, CURVE since configured
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _client(ctx: zmq.Context[Any], cfg: Any, ep: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1500)
    security.secure_client(sock, cfg, ep)
    sock.connect(ep)
    return sock


def _roundtrip(server: zmq.Socket[bytes], client: zmq.Socket[bytes]) -> bool:
    client.send(b"hello")
    if not server.poll(1500):
        return False
    ident, msg = server.recv_multipart()
    server.send_multipart([ident, msg.upper()])
    return client.recv() == b"HELLO"


def test_listed_clients_get_in_others_are_refused_and_logged(
        tmp_path: Path, keys: dict[str, Path], ctx: zmq.Context[Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lmshard.security")
    cfg = _config(tmp_path, keys)
    server, ep = _echo_server(ctx, cfg)
    assert _roundtrip(server, _client(ctx, cfg, ep))
    stranger_cfg = _config(tmp_path, keys, client="stranger")
    stranger = _client(ctx, stranger_cfg, ep)
    assert not _roundtrip(server, stranger)
    stranger_key = security.public_key_of(stranger_cfg)
    assert stranger_key and any(
        "refused CURVE client at 127.0.0.1" in r.getMessage() and stranger_key in r.getMessage()
        for r in caplog.records)
    # The allow-list is re-read when it changes: adding the stranger's key lets it in.
    (keys["allowed"] / "stranger.key").write_bytes(keys["stranger.key"].read_bytes())
    os.utime(keys["allowed"], ns=(1, 1))  # a changed mtime even within one clock tick
    assert _roundtrip(server, _client(ctx, stranger_cfg, ep))
    # A client without CURVE fails the handshake; the server logs that too.
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(ep)
    plain.send(b"hello")
    assert not server.poll(800)
    assert any("handshake failed" in r.getMessage() for r in caplog.records)
    server.close()


def test_reader_pool_over_curve_and_the_client_error_names_the_key(
        tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from lmshardd.owner import ShardOwner
    from lmshardd.readers import Reader

    caplog.set_level(logging.WARNING, logger="lmshard.security")
    cfg = _config(tmp_path, keys, shards=1, readers=1, schema="tests.schemas:schema",
                  python_path=[str(REPO)], data_dir=str(tmp_path / "data"),
                  run_dir=str(tmp_path / "run"), reader_endpoint="tcp://127.0.0.1:5800",
                  sync=False)
    owner = ShardOwner(cfg, 0)
    with owner.store.write() as w:
        w.put("blobs", 1, b"one")
    owner.close()
    reader = Reader(cfg, 0)
    reader.endpoint = "tcp://127.0.0.1:*"  # let ZeroMQ pick the port
    reader.bind()
    assert reader.sock is not None and reader.sock.curve_server == 1
    endpoint = reader.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    thread = threading.Thread(target=reader.serve_forever, daemon=True)
    thread.start()
    try:
        with ReaderPool(cfg, timeout_ms=2000, retries=0) as pool:
            pool.endpoints = [endpoint]
            one = protocol.GET.request_for(BLOBS, (1).to_bytes(8, "big"))
            assert pool.request(0, *one) == b"one"
        stranger_cfg = _config(tmp_path, keys, client="stranger", readers=1,
                               reader_endpoint="tcp://127.0.0.1:5800")
        with ReaderPool(stranger_cfg, timeout_ms=300, retries=1) as pool:
            pool.endpoints = [endpoint]
            with pytest.raises(ShardUnavailable) as exc:
                pool.request(0, *protocol.GET.request_for(BLOBS, (1).to_bytes(8, "big")))
        key = security.public_key_of(stranger_cfg)
        assert "CURVE authentication may have failed" in str(exc.value)
        assert key is not None and key in str(exc.value)
        assert any(key in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)
    finally:
        reader.stopping = True
        thread.join(10)
        zap.stop_authenticator(reader.ctx)


# -- lmshard keys new ---------------------------------------------------------------------------


def _keys_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmshard")
    add_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


def test_keys_new_writes_a_private_secret_and_a_public_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "new" / "keys"
    assert _keys_cli(["keys", "new", "web-01", "--dir", str(d)]) == 0
    public, secret = d / "web-01.key", d / "web-01.key_secret"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)
    assert sec is not None and zmq.auth.load_certificate(public) == (pub, None)
    assert pub.decode() in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exist"):
        _keys_cli(["keys", "new", "web-01", "--dir", str(d)])
    assert _keys_cli(["keys", "new", "web-01", "--dir", str(d), "--force"]) == 0
    assert zmq.auth.load_certificate(public)[0] != pub
    for bad in ("../x", ".hidden", "a/b", "x.key", "", "a" * 65):
        with pytest.raises(ConfigError, match="bad key name"):
            new_key_pair(bad, d)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        new_key_pair("ok", tmp_path / "file")


def test_a_peer_that_speaks_no_zmtp_gets_nothing_through(
        tmp_path: Path, keys: dict[str, Path], ctx: zmq.Context[Any]) -> None:
    import socket

    cfg = _config(tmp_path, keys)
    server, ep = _echo_server(ctx, cfg)
    port = int(ep.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(protocol.PING.frame(None, 1) * 10)
    assert not server.poll(500)
    raw.close()
    server.close()


def test_a_reader_on_a_network_address_without_keys_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.cluster import env_for_children

    cfg = make_config(base_dir=tmp_path, shards=1, readers=1, schema="tests.schemas:schema",
                      python_path=[str(REPO)], data_dir=str(tmp_path / "data"),
                      run_dir=str(tmp_path / "run"), reader_endpoint="tcp://10.0.0.5:5800")
    path = tmp_path / "lmshard.toml"
    path.write_text(cfg.to_toml())
    proc = subprocess.run(
        [sys.executable, "-m", "lmshardd.main", "-c", str(path), "readers"],
        capture_output=True, text=True, cwd=REPO, env=env_for_children(), timeout=60)
    assert proc.returncode == 2
    assert "tcp://10.0.0.5:5800 listens on a non-loopback address, so it must use CURVE" \
        in proc.stderr
