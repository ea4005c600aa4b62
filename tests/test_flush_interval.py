"""durability.flush_interval: commits acked once written to the OS, flushed every interval.

What a test can show on one machine: that an owner SIGKILLed with acked commits it had not
flushed yet loses none of them (the pages are in the OS page cache), that it flushes about every
interval under a steady load and not per commit, and that it flushes what is left when idle and
when it stops. What an OS crash loses (at most the last interval) needs the page cache itself to
go away, a VM or a power cut; no test here pretends to do that.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmshard.config import ConfigError, make_config
from tests.cluster import Cluster, wait_for

INTERVAL = 0.5
"""The flush interval of the steady-load test, in seconds."""


def _owner(c, shard: int = 0) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """The owner counters of ``shard`` (``stats()["shards"][n]["owner"]``)."""
    return c.stats()["shards"][shard]["owner"]  # type: ignore[no-any-return]


# -- the config --------------------------------------------------------------------------------


def test_flush_interval_is_checked_against_sync_and_metasync(tmp_path: Path) -> None:
    assert make_config(base_dir=tmp_path).flush_interval == 0.0  # off: fsync each commit
    assert make_config(base_dir=tmp_path, flush_interval=1).flush_interval == 1.0
    for other in ("sync", "metasync"):
        with pytest.raises(ConfigError) as info:
            make_config(base_dir=tmp_path, flush_interval=1.0, **{other: False})
        assert info.value.key == "durability.flush_interval"
        message = str(info.value)
        assert "durability.flush_interval = 1" in message
        assert f"needs durability.{other} = true" in message
        assert "flush_interval = 0" in message  # the hint: one or the other
    for bad in (-1, "1s", True, float("inf"), 0.0001):
        with pytest.raises(ConfigError, match=r"seconds >= 0\.001, or 0 \(off\)"):
            make_config(base_dir=tmp_path, flush_interval=bad)


def test_flush_interval_round_trips_through_the_file(tmp_path: Path) -> None:
    from lmshard.config import load_config

    cfg = make_config(base_dir=tmp_path, flush_interval=2.5)
    path = tmp_path / "lmshard.toml"
    path.write_text(cfg.to_toml(relative_to=tmp_path))
    assert load_config(path).flush_interval == 2.5
    path.write_text("[durability]\nflush_interval = 1\nsync = false\n")
    with pytest.raises(ConfigError, match="needs durability.sync = true"):
        load_config(path)


# -- the owner, in this process ------------------------------------------------------------


def test_owner_flushes_only_what_was_committed_and_once_more_when_it_stops(
    tmp_path: Path,
) -> None:
    from lmshardd.owner import ShardOwner

    cl = Cluster(tmp_path, shards=1, flush_interval=60.0)  # its config only: no processes
    owner = ShardOwner(cl.config, 0)
    try:
        assert owner.env.flags()["sync"] is False  # no fsync per commit
        health = owner.health()
        assert health["durability"] == "interval"
        assert owner.counters.flushes == 1  # what opening the store committed
        assert health["last_flush"] == owner.counters.last_flush_time > 0
        for ch in owner.channels:
            ch.tick(time.monotonic() + 120)  # due, but nothing new: no flush
        assert owner.counters.flushes == 1
        owner.store.put("blobs", 1, b"x")
        for ch in owner.channels:
            ch.tick(time.monotonic())  # something new, not due yet
        assert owner.counters.flushes == 1
    finally:
        owner.close()
        cl.stop()  # removes its run directory
    assert owner.counters.flushes == 2  # the clean stop flushed the put


def test_owner_with_fsync_per_commit_says_so(tmp_path: Path) -> None:
    from lmshardd.owner import ShardOwner

    cl = Cluster(tmp_path, shards=1)
    owner = ShardOwner(cl.config, 0)
    try:
        assert owner.env.flags()["sync"] is True
        health = owner.health()
        assert health["durability"] == "fsync" and health["last_flush"] == 0.0
        assert owner.counters.flushes == 0
    finally:
        owner.close()
        cl.stop()


# -- real owner processes ------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_owner_loses_no_acked_write_it_had_not_flushed(tmp_path: Path) -> None:
    # A long interval, so that nothing but the owner's start is flushed when it is killed.
    with Cluster(tmp_path, shards=1, flush_interval=600.0) as cl:
        with cl.client() as c:
            before = _owner(c)
            for k in range(300):
                c.put("blobs", k, k.to_bytes(4, "big") * 8)
            with c.batch() as b:
                for k in range(300, 1300):
                    b.put("blobs", k, k.to_bytes(4, "big") * 8)
            after = _owner(c)
            health = c.ping(0)
        # Every write above was acked, and none of it was flushed: the last flush is the start's.
        assert after["flushes"] == before["flushes"] == 1
        assert health["durability"] == "interval"
        assert health["last_flush"] < after["last_commit_time"]
        assert after["commits"] - before["commits"] >= 301
        cl.kill(0)  # SIGKILL: no clean stop, no last flush
        cl.start(0)
        with cl.client() as c:
            assert c.count("blobs") == 1300
            for k in range(1300):
                assert c.get("blobs", k) == k.to_bytes(4, "big") * 8, k


@pytest.mark.slow
def test_sigkilled_owner_mid_write_with_one_second_interval_loses_no_acked_write(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, shards=1, flush_interval=1.0) as cl:
        acked: list[int] = []
        with cl.client() as c:
            end = time.monotonic() + 1.5
            k = 0
            while time.monotonic() < end:
                c.put("blobs", k, k.to_bytes(4, "big"))
                acked.append(k)
                k += 1
        cl.kill(0)
        cl.start(0)
        with cl.client() as c:
            assert len(acked) > 10
            assert c.get_many("blobs", acked) == [k.to_bytes(4, "big") for k in acked]


@pytest.mark.slow
def test_owner_flushes_about_every_interval_under_load_not_every_commit(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, shards=1, flush_interval=INTERVAL) as cl, cl.client() as c:
        assert c.ping(0)["durability"] == "interval"
        keys = iter(range(10**9))

        def load_until(flushes: int) -> dict:  # type: ignore[type-arg]
            """Puts, a steady load, until the owner has flushed ``flushes`` times (or a minute
            passed); its counters then."""
            deadline = time.monotonic() + 60
            while (now := _owner(c))["flushes"] < flushes and time.monotonic() < deadline:
                for _ in range(20):
                    c.put("blobs", next(keys), b"v")
            return now

        first = load_until(_owner(c)["flushes"] + 1)  # from a flush the load caused
        now = load_until(first["flushes"] + 5)
        flushes = now["flushes"] - first["flushes"]
        commits = now["commits"] - first["commits"]
        assert flushes >= 5, (flushes, commits)
        assert commits >= 5 * flushes, (flushes, commits)  # not a flush per commit
        # Never sooner than the interval, and about on time (a loose bound: the machine may
        # be busy).
        gap = (now["last_flush_time"] - first["last_flush_time"]) / flushes
        assert 0.9 * INTERVAL <= gap <= 3 * INTERVAL, gap
        # Idle now: the owner flushes what the last puts committed without another commit.
        wait_for("the idle owner's flush",
                 lambda: _owner(c)["last_flush_time"] >= now["last_commit_time"])
