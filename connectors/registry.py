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

__all__ = ["MODEL_ARTIFACT", "REFERENCE_PATH", "REFERENCE_TAG", "MlflowReportArchive", "ModelRegistry",
           "RegistryError", "TrainingRun"]

#: Where a model version's reference profile is, relative to its run's artifact root.
REFERENCE_PATH = "reference/reference.json"
#: Model-version tag pointing at the reference artifact (value: a run-relative path).
REFERENCE_TAG = "driftloop.reference"

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"

#: The name of the logged model in a training run, and of its artifact holding the
#: trainer's own directory (what ``Trainer.load`` reads; docs/trainer.md).
MODEL_ARTIFACT = "model"
#: The python_function entry point logged as every model's code (models from code).
_PYFUNC_FILE = Path(__file__).with_name("mlflow_pyfunc.py")
#: MLflow's limits on one param value and one tag value (characters).
_MAX_PARAM = 6000
_MAX_TAG = 5000


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

    def delete_alias(self, model: str, alias: str) -> None:
        """Removes ``model@alias`` (a no-op when it is not set)."""
        if self.version_by_alias(model, alias) is None:
            return
        with self._translate(f"delete alias {model}@{alias}"):
            self._client.delete_registered_model_alias(model, alias)

    def aliases(self, model: str) -> dict[str, str]:
        """Every alias of ``model`` and the version it points at; empty when the model is missing.

        One read, so a caller sees ``champion`` and ``previous`` as of the same moment.
        """
        try:
            with self._translate(f"get aliases of {model}"):
                registered = self._client.get_registered_model(model)
        except RegistryError as exc:
            if exc.code == _NOT_FOUND:
                return {}
            raise
        return {str(k): str(v) for k, v in (registered.aliases or {}).items()}

    # -- versions --------------------------------------------------------------------------

    def register_version(self, model: str, model_uri: str, *, run_id: str, model_id: str | None = None,
                         tags: dict[str, str] | None = None, description: str | None = None) -> str:
        """Registers ``model_uri`` (a logged model, ``model_id`` its MLflow 3 id) as a new
        version of ``model``.

        Creates the registered model on first use. Returns the new version number.
        """
        operation = f"register a version of {model}"
        with self._translate(operation):
            try:
                self._client.get_registered_model(model)
            except MlflowException as exc:
                if str(exc.error_code) != _NOT_FOUND:
                    raise
                self._client.create_registered_model(model)
            clipped = {k: _clip(v, _MAX_TAG) for k, v in (tags or {}).items()}
            mv = self._client.create_model_version(model, model_uri, run_id=run_id, tags=clipped,
                                                   description=description, model_id=model_id)
        return str(mv.version)

    def delete_version(self, model: str, version: str) -> None:
        """Deletes a version (used to undo a registration whose follow-up failed)."""
        with self._translate(f"delete version {model}/{version}"):
            self._client.delete_model_version(model, str(version))

    def version_tags(self, model: str, version: str) -> dict[str, str] | None:
        """A version's tags; None when the version does not exist."""
        mv = self._version(model, version)
        return None if mv is None else dict(mv.tags or {})

    def set_version_tags(self, model: str, version: str, tags: dict[str, str]) -> None:
        with self._translate(f"tag version {model}/{version}"):
            for k, v in tags.items():
                self._client.set_model_version_tag(model, str(version), k, _clip(v, _MAX_TAG))

    def delete_version_tag(self, model: str, version: str, key: str) -> None:
        """Removes a version's tag (a no-op when the tag is not set)."""
        tags = self.version_tags(model, version)
        if tags is None or key not in tags:
            return
        with self._translate(f"delete tag {key} of version {model}/{version}"):
            self._client.delete_model_version_tag(model, str(version), key)

    def version_run_id(self, model: str, version: str) -> str | None:
        """The run that produced a version; None when the version does not exist."""
        mv = self._version(model, version)
        return None if mv is None or not mv.run_id else str(mv.run_id)

    def download_model(self, model: str, version: str, dest: Path) -> Path:
        """Downloads a version's model and returns the trainer's own directory in it.

        That directory (the ``model`` artifact of the python_function model) is what
        ``Trainer.load`` and a warm start read.

        Raises:
            RegistryError: the version does not exist, is not a driftloop model, or
                the download failed.
        """
        operation = f"download the model of {model}/{version}"
        if self._version(model, version) is None:
            msg = f"MLflow registry {self.tracking_uri}: {operation}: no such model version"
            raise RegistryError(msg, operation=operation, code=_NOT_FOUND)
        import mlflow
        import mlflow.artifacts

        with self._translate(operation):
            # A models:/ URI is resolved through the process-wide registry URI whatever
            # the arguments say (MLflow 3.17): point it at this registry first.
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model}/{version}", dst_path=str(dest),
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri))
        inner = local / "artifacts" / MODEL_ARTIFACT
        if not inner.is_dir():
            msg = (f"MLflow registry {self.tracking_uri}: {operation}: the version holds no "
                   f"artifacts/{MODEL_ARTIFACT} directory; it was not logged by driftloop "
                   "(docs/trainer.md)")
            raise RegistryError(msg, operation=operation)
        return inner

    # -- training runs ---------------------------------------------------------------------

    def start_run(self, experiment: str, run_name: str, *, tags: dict[str, str] | None = None) -> TrainingRun:
        """A new run in ``experiment`` (created on first use), for a training job."""
        with self._translate(f"start a run in experiment {experiment}"):
            exp = self._client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
            run = self._client.create_run(exp_id, run_name=run_name,
                                          tags={k: _clip(v, _MAX_TAG) for k, v in (tags or {}).items()})
        return TrainingRun(self, run.info.run_id, str(exp_id))

    def run_data(self, run_id: str) -> dict[str, Any]:
        """A run's params, metrics (latest values), tags and status, for audits and tests."""
        with self._translate(f"read run {run_id}"):
            run = self._client.get_run(run_id)
        return {"params": dict(run.data.params), "metrics": dict(run.data.metrics),
                "tags": dict(run.data.tags), "status": run.info.status}

    def set_run_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Tags a run (values clipped to MLflow's tag length), in one request."""
        from mlflow.entities import RunTag

        with self._translate(f"tag run {run_id}"):
            self._client.log_batch(run_id, tags=[RunTag(k, _clip(v, _MAX_TAG)) for k, v in tags.items()])

    def log_run_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Logs metrics to a run; non-finite values (an undefined AUC, say) are left out,
        so a missing number reads as missing, not as NaN in a comparison."""
        import math
        import time as _time

        from mlflow.entities import Metric

        now = int(_time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        with self._translate(f"log metrics of run {run_id}"):
            for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
                self._client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_run_text(self, run_id: str, text: str, path: str) -> None:
        """Writes ``text`` as the artifact ``path`` of a run (overwriting it)."""
        with self._translate(f"log {path} in run {run_id}"):
            self._client.log_text(run_id, text, path)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        with self._translate(f"read metric {key} of run {run_id}"):
            return [(int(m.step), float(m.value)) for m in self._client.get_metric_history(run_id, key)]

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

    # -- incident reports ------------------------------------------------------------------

    def log_incident_report(self, model: str, version: str, incident_id: str, transition: str,
                            html: str) -> str | None:
        """Keeps an incident's drift report with the model version it is about.

        The HTML goes to ``incidents/<id>/<transition>.html`` in the version's run, and
        the version gets the tag ``driftloop.incident.<id>`` naming it, so the registry
        UI shows which versions had incidents. Returns the artifact URI, or None when
        the version is not in this registry (a model served from elsewhere).
        """
        operation = f"log the report of incident {incident_id} with {model}/{version}"
        run_id = self._run_id(model, version, operation)
        if run_id is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in incident_id)[:200]
        path = f"incidents/{safe}/{transition}.html"
        with self._translate(operation):
            self._client.log_text(run_id, html, path)
            self._client.set_model_version_tag(model, str(version), f"driftloop.incident.{safe}",
                                               f"{transition}: {path}")
        return f"runs:/{run_id}/{path}"

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


class MlflowReportArchive:
    """Incident reports into the registry (monitor.alerting.ReportArchive).

    Reports about no model version, or about a version this registry does not hold,
    are skipped: there is nothing to attach them to.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def archive(self, *, incident_id: str, model: str, version: str | None, transition: str,
                html: str) -> None:
        if version is None:
            return
        self.registry.log_incident_report(model, version, incident_id, transition, html)


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TrainingRun:
    """One MLflow run of a training job: what the job logs, through this edge only.

    Made by `ModelRegistry.start_run`. Every call raises `RegistryError` on failure.
    """

    def __init__(self, registry: ModelRegistry, run_id: str, experiment_id: str) -> None:
        self.registry = registry
        self.run_id = run_id
        self.experiment_id = experiment_id

    def __repr__(self) -> str:
        return f"TrainingRun({self.run_id!r})"

    @property
    def _client(self) -> MlflowClient:
        return self.registry._client

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _clip(v, _MAX_PARAM)) for k, v in params.items()]
        with self.registry._translate(f"log params of run {self.run_id}"):
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.registry.log_run_metrics(self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.registry.set_run_tags(self.run_id, tags)

    def log_text(self, text: str, path: str) -> None:
        self.registry.log_run_text(self.run_id, text, path)

    def log_model(self, model_dir: Path, *, input_example: Any, code_dirs: list[Path],
                  pip_requirements: list[str]) -> tuple[str, str]:
        """Logs ``model_dir`` as a python_function model (models from code).

        Returns:
            The logged model's URI and its id (what `ModelRegistry.register_version` takes).

        Args:
            model_dir: the trainer's saved directory (``driftloop_model.json`` names its
                loader); logged as the artifact :data:`MODEL_ARTIFACT`.
            input_example: a few rows of model input; the signature is inferred from it
                and the model's own predictions on it.
            code_dirs: packages the loader needs, shipped with the model.
            pip_requirements: the scoring environment (given, not inferred: inference
                would load the model in a subprocess, slow and fragile).
        """
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import infer_signature

        operation = f"log the model of run {self.run_id}"
        with self.registry._translate(operation):
            mlflow.set_tracking_uri(self.registry.tracking_uri)
            mlflow.set_registry_uri(self.registry.tracking_uri)
            # The signature from the loaded model's own output, so it describes what
            # the registered model returns, not what the trainer thought it would.
            loaded = _load_for_signature(model_dir)
            signature = infer_signature(input_example, loaded.predict(input_example))
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT, python_model=str(_PYFUNC_FILE),
                    artifacts={MODEL_ARTIFACT: str(model_dir)},
                    code_paths=[str(d) for d in code_dirs], signature=signature,
                    input_example=input_example, pip_requirements=pip_requirements)
        return str(info.model_uri), str(info.model_id)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        with self.registry._translate(f"end run {self.run_id}"):
            self._client.set_terminated(self.run_id, status=status)


def _load_for_signature(model_dir: Path) -> Any:
    import importlib
    import json

    manifest = json.loads((model_dir / "driftloop_model.json").read_text(encoding="utf-8"))
    module, _, name = str(manifest["loader"]).partition(":")
    return getattr(importlib.import_module(module), name).load(model_dir)
