"""Pytest fixtures that give tests a real MLflow tracking server and PostgreSQL (no mock).

Loaded through ``pytest_plugins`` in tests/conftest.py. Fixtures:

* ``mlflow_server`` (session): the tracking URI of one ``mlflow server`` (SQLite backend,
  served artifacts) shared by the session; ``DRIFTLOOP_TEST_MLFLOW_URI`` names an existing
  server instead. Tests isolate themselves with unique model names (``unique_model_name``).
* ``mlflow_local`` (function): a private, started :class:`LocalMlflow`, for tests that
  stop or restart the server under the code they test.
* ``postgres_uri`` (session): a throwaway PostgreSQL cluster from Debian's packages.

Where mlflow or PostgreSQL cannot run, their tests are skipped, except under ``CI=true``,
where they fail: CI must never turn green by skipping every registry test.

Tests using them get the ``mlflow`` marker, so ``-m "not mlflow"`` leaves them out.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from monitor.testbed.local_mlflow import (
    LocalMlflow,
    LocalPostgres,
    MlflowUnavailableError,
    PostgresUnavailableError,
)

MLFLOW_FIXTURES = frozenset({"mlflow_server", "mlflow_local", "postgres_uri"})

# The test process is an MLflow client too: no usage reporting from it either.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skips the test, or fails it under CI=true (where .ci/run installs everything)."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true and {what} cannot run: {reason}", pytrace=False)
    pytest.skip(f"{what} cannot run here: {reason}")


def unique_model_name(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _start(server: LocalMlflow) -> str:
    try:
        return server.start()
    except MlflowUnavailableError as exc:
        unavailable("an MLflow server", str(exc))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MLFLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mlflow)


#: MLflow's client reads these per request; connectors.registry.ModelRegistry sets them.
_MLFLOW_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture(autouse=True)
def _restore_mlflow_http_env() -> Iterator[None]:
    """A test's ModelRegistry(timeout_s=..., max_retries=...) does not leak into the next test."""
    saved = {k: os.environ.get(k) for k in _MLFLOW_HTTP_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of the session's server (started once: a start costs 5-10 s here)."""
    external = os.environ.get("DRIFTLOOP_TEST_MLFLOW_URI", "").strip()
    if external:
        yield external
        return
    server = LocalMlflow(tmp_path_factory.mktemp("mlflow-session"))
    uri = _start(server)
    try:
        yield uri
    finally:
        server.stop()


@pytest.fixture
def mlflow_local(tmp_path: Path) -> Iterator[LocalMlflow]:
    """A started server of the test's own, which the test may stop and restart."""
    server = LocalMlflow(tmp_path / "mlflow")
    _start(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """``postgresql://driftloop@127.0.0.1:PORT/mlflow`` of a cluster started for the session."""
    pg = LocalPostgres()
    try:
        uri = pg.start()
    except PostgresUnavailableError as exc:
        unavailable("PostgreSQL", str(exc))
    try:
        yield uri
    finally:
        pg.stop()
