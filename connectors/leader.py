"""Who leads a group of replicas: one holder at a time, replaced when it dies.

The leader of a consumer group's replicas (docs/scale-out.md) is the one process that
decides incidents, sends alerts and launches and promotes models. Two kinds of lock,
matching the two state stores:

* `PostgresLeaderLock`: a session advisory lock on a dedicated connection. PostgreSQL
  releases it the moment the connection ends, so a leader killed with SIGKILL (its
  socket closes) is replaced on the next follower poll. A leader that hangs or is cut
  off keeps its socket open; the session therefore sets the server's TCP keepalives and
  ``idle_session_timeout`` so the *server* ends the session, and frees the lock, within
  the configured timeout, while a healthy leader renews (a ``SELECT 1``) well within it.
* `SqliteLeaseLock`: a lease row in the shared SQLite file, for replicas on one host:
  the holder renews an expiry; a holder that stops renewing lapses after the timeout.

Both are polled, never waited on: ``acquire`` returns at once, and the holder calls it
again to renew. A holder whose renewal fails must stop acting as leader at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from connectors.state import open_sqlite

__all__ = ["LeaderLock", "LeaderLockError", "PostgresLeaderLock", "SqliteLeaseLock", "leader_lock"]

log = logging.getLogger(__name__)


class LeaderLockError(RuntimeError):
    """The lock's database cannot be reached: leadership is unknown, so not held."""


class LeaderLock(Protocol):
    def acquire(self) -> bool:
        """Take or renew the lock; False when another holds it. Never blocks for long."""
        ...

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        ...

    def holder(self) -> str | None:
        """The holder's name, None when nobody holds it (for /status)."""
        ...

    def close(self) -> None: ...


def _key(name: str) -> int:
    """A stable signed int64 for ``pg_try_advisory_lock`` from a readable name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class PostgresLeaderLock:
    """A PostgreSQL session advisory lock held on a connection of its own.

    Args:
        dsn: libpq URI of the state store's database.
        name: the lock's name (one per consumer group); hashed to the advisory key.
        owner: this replica's instance id (the connection's application_name, which
            is how `holder` names the leader).
        timeout_s: a leader that stops answering is dropped by the server after about
            this long (keepalives for a dead host, the idle-session timeout for a hung
            process); renew at least twice as often.
    """

    def __init__(self, dsn: str, *, name: str, owner: str, timeout_s: float) -> None:
        if not (math.isfinite(timeout_s) and timeout_s >= 2):
            msg = f"timeout_s must be at least 2 seconds, got {timeout_s!r}"
            raise ValueError(msg)
        self.dsn = dsn
        self.name = name
        self.key = _key(name)
        self.owner = owner
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresLeaderLock(name={self.name!r}, owner={self.owner!r})"

    def _connect(self) -> Any:
        import psycopg

        # Keepalive probes every third of the timeout, three unanswered ones end the
        # session; both are server settings any role may set for its own session.
        probe = max(1, int(self.timeout_s // 3))
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(2, int(self.timeout_s // 2)),
                application_name=f"driftloop-leader:{self.owner}"[:63],
                keepalives=1, keepalives_idle=probe, keepalives_interval=probe, keepalives_count=3)
            conn.execute(f"SET tcp_keepalives_idle = {probe}")
            conn.execute(f"SET tcp_keepalives_interval = {probe}")
            conn.execute("SET tcp_keepalives_count = 3")
            conn.execute(f"SET idle_session_timeout = {int(self.timeout_s * 1000)}")
            conn.execute(f"SET statement_timeout = {int(self.timeout_s * 500)}")
            return conn
        except psycopg.Error as exc:
            msg = f"the leader lock's database cannot be reached: {exc}"
            raise LeaderLockError(msg) from exc

    def acquire(self) -> bool:
        import psycopg

        with self._mutex:
            if self._conn is not None:
                # Session locks stack: never take it twice; a live connection is a held lock.
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except psycopg.Error as exc:
                    log.warning("the leader lock's connection was lost, and the lock with it",
                                extra={"fields": {"owner": self.owner, "error": repr(exc)}})
                    self._drop()
                    return False
            conn = self._connect()
            try:
                got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
            except psycopg.Error as exc:
                conn.close()
                msg = f"taking the leader lock failed: {exc}"
                raise LeaderLockError(msg) from exc
            if not got:
                conn.close()
                return False
            self._conn = conn
            return True

    def _drop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None

    def release(self) -> None:
        with self._mutex:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                self._drop()

    def holder(self) -> str | None:
        import psycopg

        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
                row = conn.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                    "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid::bigint = %s AND l.objid::bigint = %s", (hi, lo)).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        return str(row[0]).removeprefix("driftloop-leader:")

    def close(self) -> None:
        self.release()


_LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS leader_leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    acquired_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"""


class SqliteLeaseLock:
    """A lease row in the shared SQLite state file: replicas on one host.

    Read and written inside ``BEGIN IMMEDIATE`` (SQLite's write lock before the read),
    so two replicas cannot both see the lease free. Wall-clock expiry: fine for
    processes on one host, which is the only place a shared SQLite file is supported.
    """

    def __init__(self, path: Path, *, name: str, owner: str, timeout_s: float,
                 clock: Any = time.time) -> None:
        self.path = Path(path)
        self.name = name
        self.owner = owner
        self.timeout_s = timeout_s
        self._clock = clock
        self._db = open_sqlite(self.path, _LEASE_SCHEMA, timeout_s=max(1.0, timeout_s / 4))
        self._mutex = threading.Lock()
        self._held = False

    def __repr__(self) -> str:
        return f"SqliteLeaseLock({str(self.path)!r}, name={self.name!r}, owner={self.owner!r})"

    def acquire(self) -> bool:
        import sqlite3

        with self._mutex:
            now = int(self._clock() * 1000)
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                msg = f"the leader lease cannot be read: {exc}"
                raise LeaderLockError(msg) from exc
            try:
                row = db.execute("SELECT owner, expires_ms FROM leader_leases WHERE name = ?",
                                 (self.name,)).fetchone()
                if row is not None and row[0] != self.owner and int(row[1]) > now:
                    db.execute("ROLLBACK")
                    self._held = False
                    return False
                if self._held and row is not None and row[0] != self.owner:
                    # Expired and not yet taken: ours again, but it lapsed meanwhile.
                    log.warning("the leader lease lapsed before it was renewed",
                                extra={"fields": {"owner": self.owner}})
                first = row is None or row[0] != self.owner
                db.execute(
                    "INSERT INTO leader_leases (name, owner, acquired_ms, expires_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                    "acquired_ms = CASE WHEN ? THEN excluded.acquired_ms ELSE acquired_ms END, "
                    "expires_ms = excluded.expires_ms",
                    (self.name, self.owner, now, now + int(self.timeout_s * 1000), first))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._held = True
            return True

    def release(self) -> None:
        with self._mutex:
            self._db.execute("DELETE FROM leader_leases WHERE name = ? AND owner = ?",
                             (self.name, self.owner))
            self._held = False

    def holder(self) -> str | None:
        now = int(self._clock() * 1000)
        row = self._db.execute("SELECT owner FROM leader_leases WHERE name = ? AND expires_ms > ?",
                               (self.name, now)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
        self._db.close()


def leader_lock(state_location: str | Path, *, group_id: str, owner: str,
                timeout_s: float) -> LeaderLock:
    """The lock that fits the state store: advisory lock on PostgreSQL, lease on SQLite."""
    name = f"driftloop.leader:{group_id}"
    loc = str(state_location)
    if loc.startswith(("postgresql://", "postgres://", "postgresql+")):
        dsn = "postgresql://" + loc.split("://", 1)[1]
        return PostgresLeaderLock(dsn, name=name, owner=owner, timeout_s=timeout_s)
    return SqliteLeaseLock(Path(loc), name=name, owner=owner, timeout_s=timeout_s)
