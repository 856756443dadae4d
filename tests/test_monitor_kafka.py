"""The monitor inside the real daemon, fed through a real broker: drift and a click drop
become incidents visible in /status, the incident log and /metrics.

Windows are 1 s of (synthetic) event time so that a minute of traffic exercises every
rule: reference bootstrap, drift with k-of-m persistence, the label join with its
attribution window, the per-event CUSUM, the period drop tests and resolution.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from connectors.state import StateStore
from monitor.incidents import Incident
from monitor.testbed.local_kafka import create_topics
from tests.daemon_proc import DaemonProcess, produce, wait_until
from tests.events_gen import BASE_TS_MS, drifting_world

pytestmark = pytest.mark.kafka

SEC = 1000
SHIFT = (30 * SEC, 45 * SEC)


def test_drift_and_click_drop_become_incidents_through_the_daemon(kafka_bootstrap: str,
                                                                   tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(kafka_bootstrap, {topics["predictions"]: 1, topics["feedback"]: 1,
                                    topics["dead_letter"]: 1})
    preds, fbs = drifting_world(75 * SEC, 2_000, SHIFT, seed=5)
    daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics, overrides={
        "windows": {"size_seconds": 1, "allowed_lateness_seconds": 0, "idle_timeout_seconds": 2},
        "monitor": {"label_types": ["click", "like"], "attribution_seconds": 3,
                    "bootstrap_seconds": 15, "resolve_after": 2, "labels_stall_seconds": 600,
                    "performance": {"period_seconds": 5},
                    "sequential": {"arl0_events": 1e6, "drops": [0.1, 0.3, 0.5]}},
    })
    daemon.start()
    try:
        daemon.wait_ready()
        produce(kafka_bootstrap, topics["predictions"], [v for _, v in preds])
        produce(kafka_bootstrap, topics["feedback"], [v for _, v in fbs])

        def firing() -> set[str]:
            # Firing, or already resolved: the shift is over within the stream, and a busy
            # machine can analyse a whole incident's life between two polls.
            status = daemon.status() or {}
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
            incidents = status.get("incidents") or {}
            return {i["fingerprint"] for key in ("firing", "recently_resolved")
                    for i in incidents.get(key, [])}

        seen: set[str] = set()

        def all_fired() -> bool:
            seen.update(firing())
            return {"feature_drift/ctr/f.age", "performance_drop/ctr/cusum:click"} <= seen

        wait_until(all_fired, 120, "the drift and the click-drop incidents to fire")
        status = daemon.status()
        assert status is not None
        assert status["monitor"]["references"]["ctr@7"].startswith("bootstrap:")
        # Every window analysed, both passes, once the stream has been consumed.
        wait_until(lambda: (daemon.status() or {}).get("monitor", {}).get("join_upto"), 120,
                   "labels to mature")
        code, metrics = daemon.get("/metrics")
        assert code == 200 and b"driftloop_incident_transitions_total" in metrics
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()

    state = StateStore(tmp_path / "state.db", group_id="driftloop-test", instance="d1")
    incidents = [Incident.from_json(r.body) for r in state.incidents(limit=1000)]
    kinds = {(i.kind, i.subject) for i in incidents}
    assert ("feature_drift", "f.age") in kinds
    assert ("performance_drop", "cusum:click") in kinds
    # Nothing but the shifted feature drifted and nothing but the clicks dropped.
    assert {s for k, s in kinds if k == "feature_drift"} == {"f.age"}
    assert {k for k, _ in kinds} <= {"feature_drift", "performance_drop"}
    age = next(i for i in incidents if i.subject == "f.age")
    assert SHIFT[0] <= age.opened_ms - BASE_TS_MS <= SHIFT[0] + 6 * SEC
    events = state.incident_events(limit=10_000)
    assert ("firing" in {e[2] for e in events}) and len({(e[1], e[2]) for e in events}) == len(events)
