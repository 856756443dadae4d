"""One small database handle over SQLite or PostgreSQL, for the stores that live on the
state store's database (training jobs, the alias history): the same SQL with ``?`` placeholders runs on
both, so a single daemon keeps its file and a cluster shares one PostgreSQL database
without a second implementation of every query.

Only what those stores need: rows, a statement's row count, and a transaction. The
dialects differ in their schemas (BIGINT and identity columns), which each store keeps
as two strings.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from connectors.state import is_postgres_url, open_sqlite

__all__ = ["SqlDb"]


class SqlDb:
    """Args:
        location: a SQLite file's path, or a ``postgresql://`` URL (psycopg is then needed).
        sqlite_schema, postgres_schema: the tables, created when missing; PostgreSQL's
            under an advisory lock, so replicas starting at once do not race on them.
        name: the connection's ``application_name`` on PostgreSQL (what ``pg_stat_activity``
            shows an operator).

    A connection is used from one thread at a time; the handle serialises calls so that
    a status read from the HTTP thread cannot interleave with a write.
    """

    def __init__(self, location: str | Path, *, sqlite_schema: str, postgres_schema: str,
                 name: str) -> None:
        loc = str(location)
        self.postgres = is_postgres_url(loc)
        self._mutex = threading.RLock()
        self._depth = 0
        self._name = name
        if self.postgres:
            self._dsn = "postgresql://" + loc.split("://", 1)[1]
            self._conn: Any = self._connect()
            with self._conn.transaction():
                # Any fixed key: schema creation is rare and short.
                self._conn.execute("SELECT pg_advisory_xact_lock(7321900413)")
                self._conn.execute(postgres_schema)
        else:
            self._conn = open_sqlite(Path(loc), sqlite_schema)

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._dsn, autocommit=True, application_name=self._name)

    def _usable(self) -> Any:
        """The connection, opened afresh if PostgreSQL dropped it since the last call (a
        restart, a failover, an idle timeout). Only between statements: a statement
        that fails mid-way raises, since whether it took effect is unknown."""
        if self.postgres and not self._depth and (self._conn.closed or self._conn.broken):
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        self._conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._mutex:
            try:
                return [tuple(r) for r in self._usable().execute(self._sql(sql), tuple(args)).fetchall()]
            except Exception as exc:
                # A read on a connection the server dropped while it sat idle is retried
                # once on a fresh one; a write is not (whether it happened is unknown),
                # and the next call reconnects.
                if not (self._dropped(exc) and sql.lstrip()[:6].upper() == "SELECT"):
                    raise
            return [tuple(r) for r in self._usable().execute(self._sql(sql), tuple(args)).fetchall()]

    def _dropped(self, exc: Exception) -> bool:
        if not self.postgres or self._depth:
            return False
        import psycopg

        return isinstance(exc, psycopg.OperationalError) and (self._conn.closed or self._conn.broken)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the rows it changed."""
        with self._mutex:
            return int(self._usable().execute(self._sql(sql), tuple(args)).rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        with self.transaction():
            if self.postgres:
                with self._conn.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)
            else:
                self._conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all (nested: the outer one)."""
        with self._mutex:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            conn = self._usable()
            self._depth = 1
            try:
                if self.postgres:
                    with conn.transaction():
                        yield
                    return
                db: sqlite3.Connection = self._conn
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                self._depth = 0
