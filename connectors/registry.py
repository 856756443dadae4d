"""The MLflow model registry: the one module of driftloop that talks to MLflow.

MLflow's client is large and raises many kinds of exceptions (``MlflowException`` with
an error code, ``RestException``, connection errors wrapped as ``INTERNAL_ERROR``);
:class:`ModelRegistry` exposes only the calls driftloop makes and translates every
failure at this edge into one :class:`RegistryError` whose message names the operation,
the model version and the server. "Not there" is not an error: a missing alias, model
version or artifact is ``None``.

Reference profiles (docs/mlflow.md) live with the model version they describe: the JSON
of ``monitor.analysis.Reference.to_json`` is an artifact of the version's run at
:data:`REFERENCE_PATH`, and the version carries the tag :data:`REFERENCE_TAG` whose value
is that run-relative path. The tag says at a glance (UI, search) which versions have a
reference; the fixed path lets a training job that logs the artifact itself, before the
version exists, be found too.

MLflow reads its HTTP settings and its telemetry switch from environment variables, so
this module sets them for the process (see :class:`ModelRegistry`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before mlflow is imported: no usage reporting from the daemon. An operator who wants
# it sets MLFLOW_DISABLE_TELEMETRY=false explicitly.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

__all__ = ["REFERENCE_PATH", "REFERENCE_TAG", "ModelRegistry", "RegistryError"]

#: Where a model version's reference profile is, relative to its run's artifact root.
REFERENCE_PATH = "reference/reference.json"
#: Model-version tag pointing at the reference artifact (value: a run-relative path).
REFERENCE_TAG = "driftloop.reference"

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistryError(RuntimeError):
    """The registry could not be read or written: unreachable, refused, or inconsistent.

    Attributes:
        operation: what was attempted, e.g. ``get version ctr/7``.
        code: MLflow's error code (``INTERNAL_ERROR``, ``PERMISSION_DENIED``, ...) or
            ``None`` for a failure below MLflow (a socket, a file).
    """

    def __init__(self, message: str, *, operation: str, code: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code


class ModelRegistry:
    """The registry calls driftloop makes, over ``mlflow.MlflowClient``.

    Args:
        tracking_uri: the MLflow tracking server, e.g. ``http://mlflow:5000``; also the
            registry URI. Artifacts are read and written through it (a server started
            with ``--serve-artifacts``) or straight from the store its runs name.
        timeout_s: bound on one HTTP request.
        max_retries: retries of a failed request (connection refused, 429, 5xx), with
            a backoff of 0, 2, 4, ... seconds. MLflow's defaults (120 s, 7 retries, about
            four minutes) would stall the analysis thread through an outage; a caller
            that can wait retries on its own schedule instead.

    MLflow's client takes these only from the environment (``MLFLOW_HTTP_REQUEST_TIMEOUT``,
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``), so they
    are set for the whole process: the daemon has one registry.

    Example:
        >>> registry = ModelRegistry("http://127.0.0.1:5000")  # doctest: +SKIP
        >>> registry.version_by_alias("ctr", "champion")  # doctest: +SKIP
        '7'
    """

    def __init__(self, tracking_uri: str, *, timeout_s: int = 10, max_retries: int = 2) -> None:
        if timeout_s <= 0:
            msg = f"timeout_s must be > 0, got {timeout_s}"
            raise ValueError(msg)
        if max_retries < 0:
            msg = f"max_retries must be >= 0, got {max_retries}"
            raise ValueError(msg)
        self.tracking_uri = tracking_uri
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(max_retries))
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def __repr__(self) -> str:
        return f"ModelRegistry({self.tracking_uri!r})"

    @contextlib.contextmanager
    def _translate(self, operation: str) -> Iterator[None]:
        """Every failure inside becomes a RegistryError naming ``operation`` and the server."""
        try:
            yield
        except MlflowException as exc:
            msg = f"MLflow registry {self.tracking_uri}: {operation} failed: {exc.message}"
            raise RegistryError(msg, operation=operation, code=str(exc.error_code)) from exc
        except (OSError, ValueError) as exc:
            # requests' ConnectionError is an OSError; a malformed answer a ValueError.
            msg = f"MLflow registry {self.tracking_uri}: {operation} failed: {exc!r}"
            raise RegistryError(msg, operation=operation) from exc

    def _version(self, model: str, version: str) -> Any | None:
        """The ModelVersion, or None when the model or the version does not exist."""
        try:
            with self._translate(f"get version {model}/{version}"):
                return self._client.get_model_version(model, str(version))
        except RegistryError as exc:
            if exc.code == _NOT_FOUND:
                return None
            raise

    # -- aliases ---------------------------------------------------------------------------

    def version_by_alias(self, model: str, alias: str) -> str | None:
        """The version ``model@alias`` points at; None when the model or the alias is missing."""
        try:
            with self._translate(f"get aliases of {model}"):
                registered = self._client.get_registered_model(model)
        except RegistryError as exc:
            if exc.code == _NOT_FOUND:
                return None
            raise
        version = (registered.aliases or {}).get(alias)
        return None if version is None else str(version)

    def set_alias(self, model: str, alias: str, version: str) -> None:
        """Points ``model@alias`` at ``version`` (moving it if it pointed elsewhere).

        Raises:
            RegistryError: the version does not exist, or the server failed.
        """
        with self._translate(f"set alias {model}@{alias} -> {version}"):
            self._client.set_registered_model_alias(model, alias, str(version))

    # -- artifacts -------------------------------------------------------------------------

    def _run_id(self, model: str, version: str, operation: str) -> str | None:
        mv = self._version(model, version)
        if mv is None:
            return None
        if not mv.run_id:
            msg = (f"MLflow registry {self.tracking_uri}: {operation}: version {model}/{version} "
                   f"was registered without a run, and driftloop keeps a version's artifacts in its "
                   f"run (register versions from a run: docs/mlflow.md)")
            raise RegistryError(msg, operation=operation)
        return str(mv.run_id)

    def download_artifact(self, model: str, version: str, path: str) -> bytes | None:
        """The bytes of the artifact at ``path`` in the run of ``model`` version ``version``.

        Returns:
            None when the model version or the artifact does not exist.

        Raises:
            RegistryError: the version has no run, or the server or the artifact store failed.
        """
        operation = f"download {path} of {model}/{version}"
        run_id = self._run_id(model, version, operation)
        return None if run_id is None else self._download(run_id, path, operation)

    def _download(self, run_id: str, path: str, operation: str) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="driftloop-artifact-") as tmp:
            try:
                with self._translate(operation):
                    local = Path(self._client.download_artifacts(run_id, path, tmp))
                    if not local.is_file():
                        msg = f"{path} is a directory, not a file"
                        raise ValueError(msg)
                    return local.read_bytes()
            except RegistryError as exc:
                if exc.code == _NOT_FOUND:
                    return None
                raise

    # -- reference profiles ----------------------------------------------------------------

    def log_reference(self, model: str, version: str, reference_json: str) -> str:
        """Stores a reference profile with a model version (overwriting an older one).

        Writes ``reference_json`` to :data:`REFERENCE_PATH` in the version's run and tags
        the version with :data:`REFERENCE_TAG`.

        Returns:
            The artifact's URI, ``runs:/<run_id>/reference/reference.json``.

        Raises:
            RegistryError: the version does not exist or has no run, or the server failed.
        """
        operation = f"log the reference of {model}/{version}"
        run_id = self._run_id(model, version, operation)
        if run_id is None:
            msg = f"MLflow registry {self.tracking_uri}: {operation}: no such model version"
            raise RegistryError(msg, operation=operation, code=_NOT_FOUND)
        with self._translate(operation):
            self._client.log_text(run_id, reference_json, REFERENCE_PATH)
            self._client.set_model_version_tag(model, str(version), REFERENCE_TAG, REFERENCE_PATH)
        return f"runs:/{run_id}/{REFERENCE_PATH}"

    def reference_json(self, model: str, version: str) -> str | None:
        """The reference profile stored with a model version, as JSON text.

        Follows the version's :data:`REFERENCE_TAG` if set, else looks at
        :data:`REFERENCE_PATH`.

        Returns:
            None when the version does not exist or has no reference.

        Raises:
            RegistryError: the server or the artifact store failed, or the tag names an
                artifact that is missing.
        """
        operation = f"read the reference of {model}/{version}"
        mv = self._version(model, version)
        if mv is None or not mv.run_id:
            return None
        tagged = (mv.tags or {}).get(REFERENCE_TAG)
        data = self._download(str(mv.run_id), tagged or REFERENCE_PATH, operation)
        if data is None and tagged:
            msg = (f"MLflow registry {self.tracking_uri}: {operation}: the version's tag "
                   f"{REFERENCE_TAG}={tagged!r} names an artifact that does not exist")
            raise RegistryError(msg, operation=operation, code=_NOT_FOUND)
        if data is None:
            return None
        with self._translate(operation):
            return data.decode("utf-8")
