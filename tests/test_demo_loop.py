"""The demo's loop end to end, shortened: a real Kafka broker, a real MLflow server, the
real daemon process, the real training job and the real simulated recommender.

`monitor.demo.loop.run_loop` is the loop ``make demo`` runs, with shorter phases: 20 s of
stable traffic, 10 s drop-test periods and a 10 s retraining window. The test checks each
link of the chain: the drift is detected, an alert reaches the webhook receiver (signed),
a training job registers a challenger, the daemon's gate promotes it (``champion`` moves
to it, ``previous`` to the old one), the recommender serves it, and its CTR is above the
drifted champion's.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from connectors.registry import ModelRegistry
from monitor.demo.loop import TOPICS, LoopSpec, run_loop
from monitor.testbed.local_kafka import LocalKafka, create_topics
from tests.mlflow_fixtures import unique_model_name

SPEC = LoopSpec(seed=3, rate=400, period_seconds=10, stable_periods=2, retrain_window_seconds=10,
                serve_after_switch_seconds=8, deadline_seconds=150)


def test_drift_is_detected_alerted_retrained_promoted_and_served(
        kafka_broker: LocalKafka, mlflow_server: str, tmp_path: Path) -> None:
    # A broker of the test's own: the topic names are the demo's (see monitor.demo.loop.TOPICS),
    # and the daemon reads them from the beginning.
    create_topics(kafka_broker.bootstrap, {TOPICS["predictions"]: 2, TOPICS["feedback"]: 2,
                                           TOPICS["dead_letter"]: 1})
    model = unique_model_name("ctr")
    lines: list[str] = []
    result = run_loop(SPEC, workdir=tmp_path, kafka=kafka_broker.bootstrap, tracking_uri=mlflow_server,
                      model=model, group_id=f"demo-{uuid.uuid4().hex[:8]}", echo=lines.append)
    log = "\n".join(lines)
    assert result.problem is None, f"{result.problem}\n{log}"
    onset = result.onset_ms
    assert onset is not None

    drift = {i["fingerprint"]: result.first_seen[k] for k, i in result.incidents.items()
             if i["kind"] in ("feature_drift", "prediction_drift")}
    assert f"feature_drift/{model}/f.age" in drift, log
    assert all(at >= onset for at in drift.values()), f"drift reported before the onset: {drift}"
    drops = [i for i in result.incidents.values() if i["kind"] == "performance_drop"]
    assert any(i["subject"] == "rate:click" for i in drops), log

    findings = ("feature_drift", "prediction_drift", "data_quality", "performance_drop")
    firing = [a for a in result.alerts if a.transition == "firing" and a.kind in findings]
    assert any(a.fingerprint == f"feature_drift/{model}/f.age" for a in firing), log
    assert all(a.at_ms >= onset for a in firing), "an alert before the onset"

    jobs = [j for j in result.jobs.values() if j.get("state") == "succeeded"]
    assert len(jobs) == 1, f"{result.jobs}\n{log}"
    version = str(jobs[0]["version"])
    registry = ModelRegistry(mlflow_server)
    assert registry.version_by_alias(model, "challenger") == version
    tags = registry.version_tags(model, version) or {}
    assert tags["driftloop.base_version"] == result.bootstrap.version
    assert float(tags["driftloop.holdout_auc"]) > float(tags["driftloop.champion_holdout_auc"])

    # Promoted by the daemon's gate (the demo itself only set the first champion).
    moves = [v for _, v, who in result.champion_moves if who != "bootstrap"]
    assert moves == [version], f"{result.champion_moves}\n{log}"
    assert registry.version_by_alias(model, "champion") == version
    assert registry.version_by_alias(model, "previous") == result.bootstrap.version
    gate = registry.run_data(str(registry.version_run_id(model, version)))["tags"]
    assert gate["driftloop.gate"] == "promote", gate.get("driftloop.gate_reason")
    assert [v for _, v in result.serving()] == [result.bootstrap.version, version]

    from monitor.demo.loop import ctr_figures, timeline

    ctr = ctr_figures(result)
    assert ctr["pre_drift"] and ctr["drifted"] and ctr["recovered"], ctr
    assert ctr["drifted"] < 0.8 * ctr["pre_drift"], ctr
    # The margin is held on the expected CTRs (the true click probability of what was
    # shown): the realised ones carry a Bernoulli spread of ~0.007 each over these few
    # thousand impressions. A clean-clone CI run once measured a realised ratio of 1.145
    # while the new champion's expected CTR was 1.32 times the drifted one's realised CTR.
    # The realised clicks must still go the same way: the expected gap is about four of
    # its standard deviations.
    assert ctr["recovered_expected"] > ctr["drifted_expected"] * 1.15, ctr
    assert ctr["recovered"] > ctr["drifted"], ctr
    names = [m.name for m in timeline(result) if m.at_ms is not None]
    assert "false alarm before onset" not in names, names
    assert result.daemon_exit == 0, "the daemon did not stop cleanly on SIGTERM"
