"""Alerts through a real Prometheus Alertmanager (the Debian package's binary, started by
the session on loopback, tests/alertmanager_fixtures.py): an injected incident is active
in Alertmanager's own API while it fires, stays active past its ``endsAt`` because it is
re-sent, and is resolved (gone from the active alerts, and notified as resolved by
Alertmanager itself) once the incident clears.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from connectors.alerts import AlertmanagerSink
from connectors.state import StateStore
from monitor.alerting import Slot
from monitor.incidents import IncidentBook
from tests.alertmanager_fixtures import Alertmanager, alertmanager  # noqa: F401 (the fixture)
from tests.daemon_proc import wait_until
from tests.test_alerting import MIN, commit, dispatcher, drift, sample


def test_alertmanager_shows_the_alert_active_then_resolved(
        tmp_path: Path, alertmanager: Alertmanager) -> None:  # noqa: F811
    am = alertmanager
    model = f"m{uuid.uuid4().hex[:8]}"  # the session's Alertmanager is shared
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook(resolve_after=1)
    resend = 1.0
    d, metrics = dispatcher(tmp_path, [Slot(AlertmanagerSink("am", am.url, resend_seconds=resend))])
    d.start()
    try:
        commit(state, book, [drift("f.age", True, MIN, model=model)])

        def active() -> list[dict]:
            return [a for a in am.alerts(model=model) if a["status"]["state"] == "active"]

        (alert,) = wait_until(active, 15, "the alert to be active in Alertmanager")
        assert alert["labels"] == {"alertname": "DriftloopFeatureDrift", "model": model,
                                   "subject": "f.age", "severity": "warning",
                                   "driftloop_source": "g"}
        assert alert["annotations"]["summary"] == "f.age drifted: PSI 0.300"
        assert alert["annotations"]["model_version"] == "7"
        assert alert["generatorURL"].endswith(f"/incidents/feature_drift/{model}/f.age@60000")
        first_ends = alert["endsAt"]
        # endsAt is now + 4 x resend: without the re-sends it would expire in 4 s.
        time.sleep(4 * resend + 1.5)
        (alert,) = active()
        assert alert["endsAt"] > first_ends
        if am.notifications is not None:
            wait_until(lambda: [s for s, _ in am.notified(model=model)] == ["firing"], 10,
                       "Alertmanager's firing notification")

        commit(state, book, [drift("f.age", False, 2 * MIN, model=model)])
        t0 = time.monotonic()
        wait_until(lambda: not active(), 15, "the alert to be resolved in Alertmanager")
        # Resolved by driftloop's endsAt, not by expiry (which would take 4 x resend).
        assert time.monotonic() - t0 < 2 * resend
        if am.notifications is not None:
            wait_until(lambda: "resolved" in [s for s, _ in am.notified(model=model)], 15,
                       "Alertmanager's resolved notification")
    finally:
        d.stop()
    assert sample(metrics, "driftloop_alerts_sent_total", sink="am") == 2
    assert [r.delivered_ms is not None for r in state.outbox_rows()] == [True, True]
