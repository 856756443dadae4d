"""The leader lock: one holder, and a dead or hung holder replaced within the timeout.

PostgreSQL cases run against the session's real cluster (tests/mlflow_fixtures.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.leader import PostgresLeaderLock, SqliteLeaseLock, leader_lock
from tests.pg_fixtures import fresh_database, terminate_sessions


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_sqlite_lease_has_one_holder_and_lapses_when_not_renewed(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "state.db"
    a = SqliteLeaseLock(db, name="leader:g", owner="a", timeout_s=10, clock=clock)
    b = SqliteLeaseLock(db, name="leader:g", owner="b", timeout_s=10, clock=clock)
    assert a.acquire() and not b.acquire()
    assert a.holder() == b.holder() == "a"
    clock.t += 9
    assert a.acquire()  # renewed: the lease now runs 10 s from here
    clock.t += 9
    assert not b.acquire()
    clock.t += 2  # a stopped renewing (killed, hung) 11 s ago
    assert b.acquire() and b.holder() == "b"
    assert not a.acquire()  # and a learns it is no longer the leader
    b.release()
    assert a.acquire()
    a.close()
    b.close()


def test_leases_of_different_groups_do_not_exclude_each_other(tmp_path: Path) -> None:
    a = SqliteLeaseLock(tmp_path / "s.db", name="leader:g1", owner="a", timeout_s=10)
    b = SqliteLeaseLock(tmp_path / "s.db", name="leader:g2", owner="b", timeout_s=10)
    assert a.acquire() and b.acquire()


def test_the_factory_picks_the_lock_that_fits_the_state_store(tmp_path: Path) -> None:
    assert isinstance(leader_lock(tmp_path / "s.db", group_id="g", owner="a", timeout_s=5), SqliteLeaseLock)
    lock = leader_lock("postgresql+psycopg://u@127.0.0.1:1/db", group_id="g", owner="a", timeout_s=5)
    assert isinstance(lock, PostgresLeaderLock) and lock.dsn == "postgresql://u@127.0.0.1:1/db"
    with pytest.raises(ValueError, match="timeout_s"):
        PostgresLeaderLock("postgresql://x/y", name="n", owner="a", timeout_s=0.5)


@pytest.fixture
def pg_url(postgres_uri: str) -> Iterator[str]:
    with fresh_database(postgres_uri) as url:
        yield url


@pytest.mark.mlflow
def test_an_advisory_lock_has_one_holder_and_frees_when_its_connection_dies(pg_url: str) -> None:
    a = PostgresLeaderLock(pg_url, name="driftloop.leader:g", owner="a", timeout_s=10)
    b = PostgresLeaderLock(pg_url, name="driftloop.leader:g", owner="b", timeout_s=10)
    try:
        assert a.acquire() and not b.acquire()
        assert a.acquire()  # renewing does not stack a second lock
        assert a.holder() == "a"
        # What SIGKILL does to the holder's socket, seen from the server.
        assert terminate_sessions(pg_url, "driftloop-leader:a") == 1
        assert b.acquire() and b.holder() == "b"
        assert not a.acquire()  # the old holder finds out on its next renewal
        b.release()
        assert a.acquire() and not b.acquire()
    finally:
        a.close()
        b.close()


@pytest.mark.mlflow
def test_a_hung_leader_is_dropped_by_the_server_within_the_timeout(pg_url: str) -> None:
    a = PostgresLeaderLock(pg_url, name="driftloop.leader:g", owner="a", timeout_s=2)
    b = PostgresLeaderLock(pg_url, name="driftloop.leader:g", owner="b", timeout_s=2)
    try:
        assert a.acquire() and not b.acquire()
        t0 = time.monotonic()
        # a stops renewing (a stopped process keeps its socket open): the server's
        # idle-session timeout ends its session and frees the lock.
        while not b.acquire():
            assert time.monotonic() - t0 < 6, "the hung holder kept the lock"
            time.sleep(0.2)
        assert 1.5 <= time.monotonic() - t0 < 6
        assert not a.acquire()
    finally:
        a.close()
        b.close()
