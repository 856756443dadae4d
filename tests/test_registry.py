"""connectors/registry.py against a real MLflow tracking server (SQLite, and PostgreSQL).

The test plays the training job with MLflow's own client (a run with a model artifact,
then a registered version), and driftloop's `ModelRegistry` does the rest.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from connectors.registry import (
    REFERENCE_PATH,
    REFERENCE_TAG,
    MlflowReportArchive,
    ModelRegistry,
    RegistryError,
)
from monitor.testbed.local_mlflow import LocalMlflow
from tests.mlflow_fixtures import unique_model_name


def register_version(uri: str, model: str, *, payload: bytes = b"weights") -> str:
    """What a training job does: a run with a model artifact, registered as a new version."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("driftloop-tests")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("driftloop-tests")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, payload.decode(), "model/weights.bin")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(model)
    except Exception:
        client.create_registered_model(model)
    mv = client.create_model_version(model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_aliases_artifacts_and_references_round_trip(mlflow_server: str) -> None:
    model = unique_model_name("ctr")
    v1 = register_version(mlflow_server, model, payload=b"one")
    v2 = register_version(mlflow_server, model, payload=b"two")
    registry = ModelRegistry(mlflow_server)

    assert registry.version_by_alias(model, "champion") is None
    registry.set_alias(model, "champion", v1)
    registry.set_alias(model, "challenger", v2)
    assert registry.version_by_alias(model, "champion") == v1
    registry.set_alias(model, "champion", v2)  # promotion moves the alias
    assert registry.version_by_alias(model, "champion") == v2
    assert registry.version_by_alias(unique_model_name("absent"), "champion") is None

    # Artifacts are served: the run's URI names the server, not a path on this machine,
    # so any process that knows the tracking URI reads them.
    run_id = MlflowClient(tracking_uri=mlflow_server).get_model_version(model, v1).run_id
    assert MlflowClient(tracking_uri=mlflow_server).get_run(run_id).info.artifact_uri.startswith(
        "mlflow-artifacts:/")
    assert registry.download_artifact(model, v1, "model/weights.bin") == b"one"
    assert registry.download_artifact(model, v2, "model/weights.bin") == b"two"
    assert registry.download_artifact(model, v1, "model/missing.bin") is None
    assert registry.download_artifact(model, "99", "model/weights.bin") is None

    assert registry.reference_json(model, v1) is None
    uri = registry.log_reference(model, v1, '{"profile": {}, "source": "training"}')
    assert uri == f"runs:/{run_id}/{REFERENCE_PATH}"
    assert registry.reference_json(model, v1) == '{"profile": {}, "source": "training"}'
    assert registry.download_artifact(model, v1, REFERENCE_PATH) == b'{"profile": {}, "source": "training"}'
    mv = MlflowClient(tracking_uri=mlflow_server).get_model_version(model, v1)
    assert mv.tags[REFERENCE_TAG] == REFERENCE_PATH
    registry.log_reference(model, v1, '{"v": 2}')  # a newer reference replaces the old
    assert registry.reference_json(model, v1) == '{"v": 2}'
    assert registry.reference_json(model, v2) is None  # each version has its own


def test_incident_reports_are_kept_with_the_model_version(mlflow_server: str) -> None:
    model = unique_model_name("ctr")
    v1 = register_version(mlflow_server, model)
    registry = ModelRegistry(mlflow_server)
    archive = MlflowReportArchive(registry)
    incident = "feature_drift/ctr/f.age@1700000060000"
    archive.archive(incident_id=incident, model=model, version=v1, transition="firing",
                    html="<html>report</html>")
    safe = "feature_drift_ctr_f.age_1700000060000"
    assert registry.download_artifact(model, v1, f"incidents/{safe}/firing.html") == b"<html>report</html>"
    assert registry.version_tags(model, v1)[f"driftloop.incident.{safe}"] == (
        f"firing: incidents/{safe}/firing.html")
    # Nothing to attach to: no version, or a version this registry does not hold.
    archive.archive(incident_id=incident, model=model, version=None, transition="firing", html="x")
    assert registry.log_incident_report(model, "99", incident, "firing", "x") is None


def test_a_reference_logged_by_the_training_run_itself_is_found_without_the_tag(
        mlflow_server: str) -> None:
    model = unique_model_name("ctr")
    version = register_version(mlflow_server, model)
    client = MlflowClient(tracking_uri=mlflow_server)
    client.log_text(client.get_model_version(model, version).run_id, '{"from": "run"}', REFERENCE_PATH)
    assert ModelRegistry(mlflow_server).reference_json(model, version) == '{"from": "run"}'


def test_errors_are_translated_at_the_edge(mlflow_server: str) -> None:
    model = unique_model_name("ctr")
    version = register_version(mlflow_server, model)
    registry = ModelRegistry(mlflow_server)
    with pytest.raises(RegistryError, match=rf"set alias {model}@champion -> 42 failed") as err:
        registry.set_alias(model, "champion", "42")
    assert mlflow_server in str(err.value) and err.value.code is not None
    with pytest.raises(RegistryError, match="no such model version"):
        registry.log_reference(model, "42", "{}")
    client = MlflowClient(tracking_uri=mlflow_server)
    client.set_model_version_tag(model, version, REFERENCE_TAG, "elsewhere/ref.json")
    with pytest.raises(RegistryError, match="names an artifact that does not exist"):
        registry.reference_json(model, version)


def test_an_unreachable_server_is_one_error_and_fails_fast() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    registry = ModelRegistry(uri, timeout_s=5, max_retries=0)
    t0 = time.monotonic()
    for call in (lambda: registry.version_by_alias("ctr", "champion"),
                 lambda: registry.reference_json("ctr", "7"),
                 lambda: registry.set_alias("ctr", "champion", "7")):
        with pytest.raises(RegistryError, match=f"MLflow registry {uri}: .* failed") as err:
            call()
        assert err.value.code == "INTERNAL_ERROR"
    assert time.monotonic() - t0 < 5


def test_the_server_runs_on_postgresql(postgres_uri: str, tmp_path: Path) -> None:
    """The documented production backend: MLflow's server over PostgreSQL from Debian."""
    with LocalMlflow(tmp_path / "mlflow-pg", backend_uri=postgres_uri) as server:
        model = unique_model_name("ctr")
        version = register_version(server.tracking_uri, model)
        registry = ModelRegistry(server.tracking_uri)
        registry.set_alias(model, "champion", version)
        registry.log_reference(model, version, '{"pg": true}')
        assert registry.version_by_alias(model, "champion") == version
        assert registry.reference_json(model, version) == '{"pg": true}'
    # The registry lives in PostgreSQL, not in a SQLite file of the server's.
    assert not (tmp_path / "mlflow-pg" / "mlflow.db").exists()
