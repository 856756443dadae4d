"""A real MLflow tracking server for tests and the demo (``mlflow server``, no mock).

:class:`LocalMlflow` drives ``deploy/mlflow/mlflow.sh`` as :mod:`monitor.testbed.local_kafka`
drives the Kafka broker: the shell script owns the server's command line, so that
``mlflow.sh start DIR`` in a terminal gives the demo exactly the server the tests use.

The server keeps its backend store in ``DIR/mlflow.db`` (SQLite) unless given another
backend URI (PostgreSQL in production: docs/mlflow.md), and *serves* its artifacts from
``DIR/artifacts``: runs get ``mlflow-artifacts:/`` URIs that any client resolves
through the tracking URI, so a process that knows only the URI reads every artifact.

Typical use::

    with LocalMlflow(tmp_path / "mlflow") as server:
        registry = ModelRegistry(server.tracking_uri)
        ...
        server.restart()  # same port, same data

:class:`LocalPostgres` starts a throwaway PostgreSQL cluster from Debian's packages,
for the test that runs the MLflow server against its production backend.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "MLFLOW_SH",
    "LocalMlflow",
    "LocalMlflowError",
    "LocalPostgres",
    "MlflowUnavailableError",
    "PostgresUnavailableError",
]

#: Found from this file, so that it works from any working directory.
MLFLOW_SH = Path(__file__).resolve().parents[2] / "deploy" / "mlflow" / "mlflow.sh"

# mlflow.sh exits with this code when mlflow is not installed for the interpreter.
_EXIT_MISSING_TOOL = 4


class LocalMlflowError(RuntimeError):
    """A local server (MLflow or PostgreSQL) failed to start or stop; the message has its log tail."""


class MlflowUnavailableError(LocalMlflowError):
    """This machine cannot run ``mlflow server`` (mlflow not installed, no bash).

    A separate type because test fixtures skip on it (outside CI) instead of failing.
    """


class PostgresUnavailableError(LocalMlflowError):
    """PostgreSQL's server binaries are not installed (Debian: ``apt-get install postgresql``)."""


def _run_mlflow_sh(args: list[str], timeout_s: float, env: Mapping[str, str] | None) -> str:
    if not MLFLOW_SH.is_file():
        msg = f"{MLFLOW_SH} not found: LocalMlflow needs a driftloop source checkout"
        raise LocalMlflowError(msg)
    # The server runs on this interpreter, so that the tests' mlflow is the server's.
    run_env = {"DRIFTLOOP_MLFLOW_PYTHON": sys.executable, **os.environ, **(env or {})}
    try:
        proc = subprocess.run(["bash", str(MLFLOW_SH), *args], capture_output=True, text=True,
                              timeout=timeout_s, env=run_env, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as exc:
        msg = "bash not found: deploy/mlflow/mlflow.sh needs bash"
        raise MlflowUnavailableError(msg) from exc
    except subprocess.TimeoutExpired as exc:
        msg = f"mlflow.sh {' '.join(args)} ran past {timeout_s:.0f}s"
        raise LocalMlflowError(msg) from exc
    stderr = proc.stderr.strip()
    if proc.returncode == _EXIT_MISSING_TOOL:
        raise MlflowUnavailableError(stderr.removeprefix("mlflow.sh: "))
    if proc.returncode != 0:
        msg = f"mlflow.sh {' '.join(args)} failed (exit {proc.returncode}):\n{stderr}"
        raise LocalMlflowError(msg)
    return proc.stdout


@dataclass
class LocalMlflow:
    """One ``mlflow server`` whose backend store, artifacts and log live in ``data_dir``.

    Attributes:
        data_dir: ``mlflow.db`` (the SQLite backend store), ``artifacts/`` (served by
            the server) and ``mlflow.log``. Reusing it keeps the registry.
        port: The port on 127.0.0.1; ``None`` picks a free one on the first start and
            keeps it, so that :meth:`restart` comes back on the same URI.
        backend_uri: A backend store instead of SQLite, e.g. ``postgresql://...``.
        start_timeout_s: Bound on one start (the first import of mlflow on a cold
            machine takes a while).
        stop_at_exit: Stop the server when the interpreter exits.
    """

    data_dir: Path
    port: int | None = None
    backend_uri: str | None = None
    start_timeout_s: float = 180.0
    stop_at_exit: bool = True
    _uri: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def tracking_uri(self) -> str:
        """``http://127.0.0.1:PORT``.

        Raises:
            LocalMlflowError: The server was not started (or was stopped).
        """
        if self._uri is None:
            msg = f"the MLflow server in {self.data_dir} is not running: call start() first"
            raise LocalMlflowError(msg)
        return self._uri

    def _env(self) -> dict[str, str]:
        return {"DRIFTLOOP_MLFLOW_BACKEND_URI": self.backend_uri} if self.backend_uri else {}

    def start(self) -> str:
        """Starts the server and waits until ``/health`` answers; a no-op when it runs.

        Returns:
            The tracking URI.

        Raises:
            MlflowUnavailableError: mlflow is not installed for this interpreter.
            LocalMlflowError: The server did not come up (the message has its log tail).
        """
        args = ["start", str(self.data_dir)]
        if self.port is not None:
            args.append(str(self.port))
        out = _run_mlflow_sh(args, self.start_timeout_s, self._env())
        lines = out.strip().splitlines()
        uri = lines[-1].strip() if lines else ""
        prefix = "http://127.0.0.1:"
        if not uri.startswith(prefix) or not uri[len(prefix):].isdigit():
            msg = f"mlflow.sh start printed {out!r}, not a tracking URI"
            raise LocalMlflowError(msg)
        self.port = int(uri[len(prefix):])
        self._uri = uri
        if self.stop_at_exit:
            atexit.unregister(self._stop_quietly)
            atexit.register(self._stop_quietly)
        return uri

    def stop(self) -> None:
        """Stops the server's process group: SIGTERM, SIGKILL after 30 s. Keeps ``data_dir``."""
        _run_mlflow_sh(["stop", str(self.data_dir)], 60.0, self._env())
        self._uri = None
        atexit.unregister(self._stop_quietly)

    def restart(self) -> str:
        """Stops and starts the server on the same port with the same data."""
        if self.port is None:
            msg = "restart() needs a server that was started before"
            raise LocalMlflowError(msg)
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        try:
            _run_mlflow_sh(["status", str(self.data_dir)], 30.0, self._env())
        except LocalMlflowError:
            return False
        return True

    def _stop_quietly(self) -> None:
        with contextlib.suppress(LocalMlflowError):
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- PostgreSQL ---------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``.

    ``DRIFTLOOP_PG_BINDIR`` names another one.

    Raises:
        PostgresUnavailableError: none is installed.
    """
    override = os.environ.get("DRIFTLOOP_PG_BINDIR", "").strip()
    candidates = [Path(override)] if override else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    msg = ("PostgreSQL's server binaries are not installed (looked in "
           f"{override or '/usr/lib/postgresql/*/bin'}; Debian: apt-get install postgresql)")
    raise PostgresUnavailableError(msg)


def _unprivileged_user() -> pwd.struct_passwd:
    """Whom to run PostgreSQL as when we are root (initdb refuses root)."""
    if shutil.which("runuser") is None:
        msg = "running as root and runuser is missing: initdb refuses to run as root"
        raise PostgresUnavailableError(msg)
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    msg = "running as root and there is no postgres or nobody user to run initdb as"
    raise PostgresUnavailableError(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPostgres:
    """A throwaway PostgreSQL cluster on a loopback port, with one database.

    ``initdb`` refuses to run as root, and tests and CI run as root here: the cluster
    then runs as an unprivileged user (``postgres``, which Debian's package creates,
    else ``nobody``) through ``runuser``, in a directory of its own under the system
    temporary directory (pytest's temporary directories are closed to other users).
    The unix socket goes into that directory too, never into /var/run/postgresql.
    Authentication is ``trust`` on loopback only: a test database, never a deployment.

    Attributes:
        database: the database created after the start.
        user: the role clients connect as (the cluster's superuser).
    """

    database: str = "mlflow"
    user: str = "driftloop"
    port: int | None = None
    start_timeout_s: float = 60.0
    _dir: Path | None = field(default=None, init=False, repr=False)
    _os_user: str | None = field(default=None, init=False, repr=False)

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI MLflow's ``--backend-store-uri`` takes."""
        if self._dir is None:
            msg = "PostgreSQL is not running: call start() first"
            raise LocalMlflowError(msg)
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, argv: list[str], timeout_s: float) -> str:
        if self._os_user is not None:
            argv = ["runuser", "-u", self._os_user, "--", *argv]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, check=False, cwd=self._dir)
        except subprocess.TimeoutExpired as exc:
            msg = f"{Path(argv[0]).name} ran past {timeout_s:.0f}s"
            raise LocalMlflowError(msg) from exc
        if proc.returncode != 0:
            log = ""
            if self._dir is not None and (self._dir / "postgres.log").exists():
                log = "\n".join((self._dir / "postgres.log").read_text().splitlines()[-20:])
            msg = f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}\n{log}"
            raise LocalMlflowError(msg)
        return proc.stdout

    def start(self) -> str:
        """initdb, start on a free loopback port, create the database; returns :attr:`uri`.

        Raises:
            PostgresUnavailableError: no PostgreSQL binaries, or running as root with
                neither ``runuser`` nor an unprivileged user to run them as.
            LocalMlflowError: a step failed (the message has the server's log tail).
        """
        if self._dir is not None:
            return self.uri
        bindir = postgres_bindir()
        owner = _unprivileged_user() if os.geteuid() == 0 else None
        base = Path(tempfile.mkdtemp(prefix="driftloop-pg-"))
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
            self._os_user = owner.pw_name
        self._dir = base
        data = base / "data"
        self.port = self.port or _free_port()
        try:
            self._run([str(bindir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"], 120.0)
            opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                    f"-c unix_socket_directories={base} -c fsync=off -c full_page_writes=off "
                    "-c synchronous_commit=off -c max_connections=50 -c shared_buffers=32MB")
            self._run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"),
                       "-o", opts, "-w", "-t", str(int(self.start_timeout_s)), "start"],
                      self.start_timeout_s + 10)
            self._run([str(bindir / "createdb"), "-h", str(base), "-p", str(self.port), "-U", self.user,
                       self.database], 60.0)
        except BaseException:
            self.stop()
            raise
        atexit.unregister(self._stop_quietly)
        atexit.register(self._stop_quietly)
        return self.uri

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``) and remove the cluster's directory."""
        base, self._dir = self._dir, None
        atexit.unregister(self._stop_quietly)
        if base is None:
            return
        data = base / "data"
        try:
            if (data / "postmaster.pid").exists():
                self._dir = base
                self._run([str(postgres_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                           "stop"], 60.0)
        finally:
            self._dir = None
            shutil.rmtree(base, ignore_errors=True)

    def _stop_quietly(self) -> None:
        with contextlib.suppress(LocalMlflowError):
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

