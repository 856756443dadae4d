"""References follow the model: the analysis stage reads the reference profile stored with
the model version in a real MLflow server, and an MLflow outage never stops it.

The harness is tests/test_analysis.py's (the real Ingestor and Analysis on a simulated
recommender whose feature ``age`` shifts from minute 15); the reference is what the model
saw in training, here the world's first 10 quiet minutes, as in
test_a_stored_reference_is_used_instead_of_bootstrapping with a directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from connectors.events import EventKind, decode_batch
from connectors.registry import ModelRegistry
from connectors.state import StateStore
from monitor.analysis import Analysis, DirectoryReferences
from monitor.config import load_config
from monitor.metrics import Metrics
from monitor.references import FirstOf, MlflowReferences
from monitor.stats.profile import Profile
from monitor.stats.reference import Reference
from monitor.testbed.local_mlflow import LocalMlflow
from tests.events_gen import BASE_TS_MS, drifting_world
from tests.test_analysis import MIN, RATE, SHIFT, SPEC, F, P, Run, _feed, _incidents, _start
from tests.test_registry import _closed_port, register_version

#: The drift test stops here: the shift starts at 15 min and is decided 3 windows later.
CUT = BASE_TS_MS + 20 * MIN


@pytest.fixture(scope="module")
def world():
    # The same world (seed, rate, shift) as tests/test_analysis.py's.
    preds, fbs = drifting_world(45 * MIN, RATE, SHIFT, seed=11)
    return [p for p in preds if p[0] < CUT], [f for f in fbs if f[0] < CUT]


def _training_reference(preds) -> Reference:
    train = decode_batch(EventKind.PREDICTION, [v for t, v in preds if t < BASE_TS_MS + 10 * MIN],
                         max_bytes=65536).table
    cols = [c for c in train.column_names if c == "score" or c.startswith("f.")]
    return Reference(Profile.fit(train.select(cols).to_pandas(), SPEC.profile), None, "training")


def _publish_ctr_v7(uri: str, reference: Reference | None) -> None:
    """The simulated traffic is model ``ctr`` version 7: register versions up to 7 and log
    the reference with version 7, as the training job that made it would."""
    while int(register_version(uri, "ctr")) < 7:
        pass
    if reference is not None:
        ModelRegistry(uri).log_reference("ctr", "7", reference.to_json())


def _with_references(run: Run, tmp: Path, references) -> Run:
    run.analysis.state.close()
    run.analysis = Analysis(SPEC, StateStore(tmp / "state.db", group_id="g", instance="a"), P, F,
                            references, Metrics())
    return run


def _age_incidents(run: Run):
    return [i for i in _incidents(run.analysis.state) if i.kind == "feature_drift"]


def test_the_analysis_uses_the_reference_stored_with_the_version_in_mlflow(
        mlflow_server: str, world, tmp_path: Path) -> None:
    preds, fbs = world
    _publish_ctr_v7(mlflow_server, _training_reference(preds))
    run = _with_references(_start(tmp_path), tmp_path, MlflowReferences(ModelRegistry(mlflow_server)))
    _feed(run, preds, fbs)
    assert run.analysis.status()["references"]["ctr@7"] == "mlflow:models:/ctr/7"
    age = _age_incidents(run)
    assert [i.subject for i in age] == ["f.age"]
    # The same decision, at the same window, as with the reference in a directory.
    assert age[0].opened_ms == BASE_TS_MS + SHIFT[0] + 3 * MIN
    assert age[0].opening_evidence["reference"] == "mlflow:models:/ctr/7"


def test_after_an_outage_and_a_late_reference_the_stored_one_is_still_picked_up(
        mlflow_local: LocalMlflow, world, tmp_path: Path) -> None:
    """MLflow is down for the version's first 5 minutes, then up without a reference for
    3 more, then the reference is logged: the next window finds it, before the bootstrap
    (10 minutes) would have settled for live traffic."""
    preds, fbs = world
    uri = mlflow_local.tracking_uri
    _publish_ctr_v7(uri, None)
    mlflow_local.stop()
    registry = ModelRegistry(uri, timeout_s=5, max_retries=0)
    run = _with_references(_start(tmp_path), tmp_path, MlflowReferences(registry))
    seen: dict[int, dict] = {}

    def outage_then_late_reference(upto: int) -> None:
        minute = (upto - BASE_TS_MS) // MIN
        if (upto - BASE_TS_MS) % MIN or minute not in (5, 8):
            return
        seen[minute] = run.analysis.status()
        if minute == 5:
            mlflow_local.start()  # same port, same data
        else:
            ModelRegistry(uri).log_reference("ctr", "7", _training_reference(preds).to_json())

    _feed(run, preds, fbs, after_slice=outage_then_late_reference)
    # Windows were analysed all along (an outage is no crash), without a reference...
    for minute in (5, 8):
        assert seen[minute]["drift_upto"] is not None and seen[minute]["references"]["ctr@7"] is None
    # ... until the one logged late was found.
    assert run.analysis.status()["references"]["ctr@7"] == "mlflow:models:/ctr/7"
    age = _age_incidents(run)
    assert [i.subject for i in age] == ["f.age"]
    assert age[0].opened_ms == BASE_TS_MS + SHIFT[0] + 3 * MIN


def test_an_outage_that_outlasts_the_bootstrap_period_bootstraps_and_monitoring_goes_on(
        world, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    preds, fbs = world
    # Nothing listens there: what a stopped server looks like to a client.
    registry = ModelRegistry(f"http://127.0.0.1:{_closed_port()}", timeout_s=5, max_retries=0)
    run = _with_references(_start(tmp_path), tmp_path, MlflowReferences(registry))
    with caplog.at_level(logging.WARNING, logger="monitor.analysis"):
        _feed(run, preds, fbs)
    assert run.analysis.status()["references"]["ctr@7"].startswith("bootstrap:")
    failed = [r for r in caplog.records if r.getMessage().startswith("reference lookup failed")]
    # One lookup per drift window until the bootstrap (10 one-minute windows), then none:
    # an outage costs one quick failure a window, never a stall or a retry storm.
    assert len(failed) == SPEC.bootstrap_ms // MIN
    assert [i.subject for i in _age_incidents(run)] == ["f.age"]


def test_the_daemon_takes_references_from_mlflow_first_then_the_directory(tmp_path: Path) -> None:
    from monitor.service.wiring import references, registry

    def _references(config):  # type: ignore[no-untyped-def]
        return references(config, registry(config))

    uri = "http://127.0.0.1:5000"
    only_mlflow = _references(load_config(None, {"DRIFTLOOP__MLFLOW__TRACKING_URI": uri}))
    assert isinstance(only_mlflow, MlflowReferences)
    assert only_mlflow.registry.tracking_uri == uri
    both = _references(load_config(None, {"DRIFTLOOP__MLFLOW__TRACKING_URI": uri,
                                           "DRIFTLOOP__MONITOR__REFERENCE_DIR": str(tmp_path)}))
    assert isinstance(both, FirstOf)
    assert [type(s) for s in both.sources] == [MlflowReferences, DirectoryReferences]
    assert _references(load_config(None, {})) is None
