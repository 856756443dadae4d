"""Fresh PostgreSQL databases on the session's throwaway cluster (tests/mlflow_fixtures.py).

One database per test, so a test sees only its own tables and can be run alone or in any
order; creating one from ``template0`` takes a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from tests.mlflow_fixtures import unavailable


def psycopg_or_skip():  # type: ignore[no-untyped-def]
    """psycopg, or skip (fail under CI=true): it is the ``postgres`` extra, not a core dependency."""
    try:
        import psycopg
    except ImportError as exc:
        unavailable("the PostgreSQL state store", f"psycopg is not installed ({exc})")
    return psycopg


def database_url(cluster_uri: str, dbname: str) -> str:
    return f"{cluster_uri.rsplit('/', 1)[0]}/{dbname}"


@contextlib.contextmanager
def fresh_database(cluster_uri: str) -> Iterator[str]:
    """A new, empty database on the cluster; yields its URL, drops it afterwards."""
    psycopg = psycopg_or_skip()
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(cluster_uri, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield database_url(cluster_uri, name)
    finally:
        with psycopg.connect(cluster_uri, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_sessions(url: str, application_name: str) -> int:
    """Kill the server side of every session of ``application_name`` (a dropped
    connection, as a server restart or a network cut leaves it); returns how many."""
    psycopg = psycopg_or_skip()
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()", (application_name,)).fetchall()
    return sum(1 for (ok,) in rows if ok)
