"""The daemon's retraining controller: incidents in, one job out, failures as incidents.

Real state store, real MLflow server (the champion lookup), real job processes (the
stand-in entry point tests/fake_jobs.py, so these run in seconds; the real training job
is tests/test_job.py), and the real analysis stage committing the incidents.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from connectors.registry import ModelRegistry
from connectors.state import SegmentRecord, StateStore
from monitor.analysis import Analysis
from monitor.config import Config
from monitor.incidents import Incident, IncidentBook, Severity, Signal
from monitor.metrics import Metrics
from monitor.retraining import FAILED_KIND, RetrainController
from retrain.launch import LocalLauncher
from tests.mlflow_fixtures import unique_model_name
from tests.test_alerting import commit
from tests.test_analysis import SPEC

MIN = 60_000
T0 = 1_767_225_600_000
REPO = Path(__file__).resolve().parents[1]


def config(tmp: Path, uri: str, **retrain: Any) -> Config:
    return msgspec.convert({
        "storage": {"data_dir": str(tmp)},
        "kafka": {"group_id": "g"},
        "mlflow": {"tracking_uri": uri},
        "retrain": {"enabled": True, "cooldown_seconds": 3600, "min_fresh_labels": 1000,
                    **retrain},
    }, Config)


def state_with_matured_windows(tmp: Path, rows_per_window: int = 500, windows: int = 120) -> StateStore:
    """A state store whose predictions and feedback windows are closed and recorded, as
    the ingestor leaves them: 2 hours of 1-minute windows."""
    state = StateStore(tmp / "state.db", group_id="g", instance="a")
    segs = [SegmentRecord(str(tmp / f"p{w}.parquet"), "predictions", "final", T0 + w * MIN, rows_per_window,
                          True) for w in range(windows)]
    state.checkpoint([], new_segments=segs, closed_upto={"predictions": T0 + windows * MIN,
                                                          "feedback": T0 + windows * MIN})
    return state


def incident(model: str, subject: str, at: int, kind: str = "performance_drop") -> Signal:
    return Signal(kind, model, subject, True, at - MIN, at, Severity.WARNING,
                  summary=f"{subject} dropped", evidence={"observed": 0.03})


def controller(tmp: Path, uri: str, behaviour: str = "succeed", sleep_s: float = 0.3,
               metrics: Metrics | None = None,
               **retrain: Any) -> tuple[RetrainController, list[dict[str, Any]]]:
    submitted: list[dict[str, Any]] = []
    c = RetrainController(
        config(tmp, uri, params={"behaviour": behaviour, "sleep_s": sleep_s}, **retrain),
        registry=ModelRegistry(uri),
        submit=lambda **kw: submitted.append(kw),
        launcher=LocalLauncher(module="tests.fake_jobs", cwd=REPO), metrics=metrics)
    return c, submitted


def wait_for_events(c: RetrainController, state: StateStore, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(r.state in ("pending", "running") for r in c.jobs.jobs()):
        assert time.monotonic() < deadline, "the job did not finish"
        c.step(state)
        time.sleep(0.1)
    c.step(state)


def test_repeated_incidents_start_one_job_and_every_decision_has_its_reason(
        mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    state = state_with_matured_windows(tmp_path)
    metrics = Metrics()
    c, _ = controller(tmp_path, mlflow_server, metrics=metrics)
    book = IncidentBook()
    end = T0 + 120 * MIN
    commit(state, book, [incident(model, f"rate:click{i}", end) for i in range(5)])
    decisions = c.step(state)
    assert [d.code for d in decisions] == ["launched", "running", "running", "running", "running"]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": model, **labels})

    assert sample("driftloop_retrain_decisions_total", code="running") == 4
    assert sample("driftloop_retrain_decisions_total", code="launched") == 1
    assert metrics.registry.get_sample_value("driftloop_retrain_jobs_running") == 1
    assert "running" in decisions[1].reason
    (job,) = c.jobs.jobs(model=model)
    # The job reads the newest stretch whose labels are final (the feedback windows are
    # closed one attribution window, 30 min, past it); no champion yet: from scratch.
    assert job.spec.data_end_ms == end - 30 * MIN and job.spec.base_version is None
    assert job.spec.trigger.incident_kind == "performance_drop"
    wait_for_events(c, state)
    assert c.jobs.get(job.job_id).state == "succeeded"  # type: ignore[union-attr]
    assert sample("driftloop_retrain_jobs_finished_total", state="succeeded") == 1
    assert metrics.registry.get_sample_value("driftloop_retrain_jobs_running") == 0

    # More incidents after it finished: the cooldown holds them off.
    commit(state, book, [incident(model, "calibration", end + MIN)])
    (late,) = c.step(state)
    assert late.code == "cooldown" and not late.launch
    assert len(c.jobs.jobs(model=model)) == 1
    # The incident cursor is durable: a restarted controller does not decide them again.
    c2, _ = controller(tmp_path, mlflow_server)
    assert c2.step(state) == []
    shown = c.status()["decisions"]
    assert [d["code"] for d in shown][:2] == ["cooldown", "running"]
    c.jobs.close()
    c2.jobs.close()


def test_a_person_can_retrain_inside_the_cooldown_but_never_beside_a_running_job(
        mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    state = state_with_matured_windows(tmp_path)
    c, _ = controller(tmp_path, mlflow_server, sleep_s=1.0)
    assert c.manual({"model": model, "who": "alice"})[0] == 202
    assert c.manual({"model": model, "who": "bob"})[0] == 202
    first, second = c.step(state)
    assert first.code == "launched" and second.code == "running"
    wait_for_events(c, state)
    c.manual({"model": model, "who": "carol", "reason": "again"})
    (third,) = c.step(state)
    assert third.code == "too_few_labels"  # nothing matured since the last run's window
    more = [SegmentRecord(str(tmp_path / f"q{w}.parquet"), "predictions", "final", T0 + w * MIN, 500, True)
            for w in range(120, 160)]
    state.checkpoint([], new_segments=more, closed_upto={"predictions": T0 + 160 * MIN,
                                                         "feedback": T0 + 160 * MIN})
    c.manual({"model": model, "who": "carol", "reason": "new data is in"})
    (fourth,) = c.step(state)
    assert fourth.code == "launched"  # inside the cooldown: manual_bypasses_cooldown
    assert c.manual({})[0] == 400
    c.jobs.close()


def test_too_few_fresh_labels_start_nothing(mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    # 60 windows of 5 predictions; the newest 30 are not matured yet (attribution 30 min).
    state = state_with_matured_windows(tmp_path, rows_per_window=5, windows=60)
    c, _ = controller(tmp_path, mlflow_server)
    c.manual({"model": model})
    (d,) = c.step(state)
    assert d.code == "too_few_labels" and "150 fresh" in d.reason
    assert c.jobs.jobs(model=model) == []
    c.jobs.close()


def test_a_failed_job_is_an_incident_and_the_next_success_resolves_it(
        mlflow_server: str, tmp_path: Path) -> None:
    model = unique_model_name("ctr")
    state = state_with_matured_windows(tmp_path)
    c, submitted = controller(tmp_path, mlflow_server, behaviour="fail_exit", cooldown_seconds=0)
    c.manual({"model": model})
    c.step(state)
    wait_for_events(c, state)
    (failure,) = submitted
    (signal,) = failure["signals"]
    assert signal.kind == FAILED_KIND and signal.firing and signal.model == model
    assert "exit" in signal.summary and signal.evidence["state"] == "failed"
    c.step(state)
    assert len(submitted) == 1  # handed out once ...
    # ... and, until the incident is committed, again by the next leader's controller
    # (this one might have died holding it).
    successor, resubmitted = controller(tmp_path, mlflow_server, behaviour="fail_exit", cooldown_seconds=0)
    successor.step(state)
    assert [s.kind for s in resubmitted[0]["signals"]] == [FAILED_KIND]
    successor.jobs.close()

    # The analysis stage commits it as an incident (one writer of the incident book; its
    # own store here, without the stand-in segments, which it would try to read) ...
    incidents = StateStore(tmp_path / "incidents.db", group_id="g", instance="a")
    analysis = Analysis(SPEC, incidents, "predictions", "feedback", None, Metrics())
    analysis.submit(**failure)
    analysis.step()
    (row,) = incidents.incidents(status="firing")
    assert Incident.from_json(row.body).fingerprint == f"{FAILED_KIND}/{model}/training"
    analysis.submit(**resubmitted[0])  # the successor's copy: the same incident, no new event
    analysis.step()
    assert len(incidents.incidents()) == 1 and len(incidents.incident_events()) == 1
    c.step(state)  # takes the acknowledgement: the outcome is durable, nobody reports it again
    assert c.jobs.unreported() == []

    # ... and the next job that succeeds resolves it.
    c.config = config(tmp_path, mlflow_server, cooldown_seconds=0,
                      params={"behaviour": "succeed", "sleep_s": 0.1})
    c.manual({"model": model})
    c.step(state)
    wait_for_events(c, state)
    resolution = submitted[-1]
    assert resolution["resolve"][0][0] == f"{FAILED_KIND}/{model}/training"
    analysis.submit(**resolution)
    analysis.step()
    assert incidents.incidents(status="firing") == []
    events = [e[2] for e in incidents.incident_events()]
    assert events == ["firing", "resolved"]
    c.jobs.close()


def test_a_leader_that_owns_no_partition_still_sees_what_has_matured(mlflow_server: str,
                                                                     tmp_path: Path) -> None:
    """With several replicas the leader may own no partition: its own clock never moves,
    and what is final is the group's to say (seen in the cluster test: every manual
    request answered no_data while the other replica had closed an hour of windows)."""
    state_with_matured_windows(tmp_path).close()  # replica "a" closed the windows
    leader = StateStore(tmp_path / "state.db", group_id="g", instance="leader")
    solo = RetrainController(config(tmp_path, mlflow_server), registry=ModelRegistry(mlflow_server),
                             submit=lambda **kw: None)
    clustered = RetrainController(
        msgspec.convert({**msgspec.to_builtins(config(tmp_path, mlflow_server)),
                         "cluster": {"enabled": True}}, Config),
        registry=ModelRegistry(mlflow_server), submit=lambda **kw: None)
    try:
        assert solo._matured_upto(leader) is None  # one daemon: its own clock
        upto = clustered._matured_upto(leader)
        assert upto is not None and upto > T0
    finally:
        for c in (solo, clustered):
            c.jobs.close()
        leader.close()
