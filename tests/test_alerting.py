"""Alert delivery (monitor/alerting.py): the outbox in the state store, the sender
threads, retries, give-up, rate limits, grouping and routing, against real local HTTP
receivers and a real SQLite state store.

Incidents are injected the way the analysis stage commits them: an `IncidentBook`
observes signals and `StateStore.commit_monitor` writes the incidents and their
transitions in one transaction (monitor/analysis.py `Analysis._commit`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from connectors.alerts import AlertBatch, SlackSink, WebhookSink, decode_signing_keys
from connectors.state import IncidentRow, MonitorCommit, StateStore
from monitor.alerting import (
    CURSOR_KEY,
    AlertDispatcher,
    ArchiveSink,
    DeliverySpec,
    Route,
    Slot,
    TokenBucket,
    plan_batches,
)
from monitor.incidents import Incident, IncidentBook, Severity, Signal
from monitor.metrics import Metrics
from tests.daemon_proc import wait_until
from tests.receivers import Answer, HangingReceiver, Receiver, Request, standard_webhooks_verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
KEYS = decode_signing_keys(SECRET)
MIN = 60_000


def commit(state: StateStore, book: IncidentBook, signals: Sequence[Signal]) -> list[str]:
    """What Analysis._commit does: incidents and their transitions in one transaction."""
    out = book.observe(signals)
    state.commit_monitor(MonitorCommit(
        incidents=tuple(IncidentRow(i.id, i.fingerprint, i.status, i.opened_ms, i.updated_ms,
                                    i.to_json()) for i in out.touched),
        events=tuple((t.incident.id, t.transition, t.incident.to_json()) for t in out.transitions)))
    return [f"{t.transition}:{t.incident.id}" for t in out.transitions]


def drift(subject: str, firing: bool, end: int, *, model: str = "ctr", psi: float = 0.3,
          kind: str = "feature_drift", severity: Severity = Severity.WARNING) -> Signal:
    return Signal(kind, model, subject, firing, end - MIN, end, severity,
                  summary=f"{subject} drifted: PSI {psi:.3f}" if firing else "",
                  evidence={"version": "7", "psi": psi if firing else 0.001, "p_adjusted": 1e-9,
                            "edges": [1.0, 2.0], "reference_counts": [10, 20, 30],
                            "window_counts": [30, 20, 10]})


def dispatcher(tmp: Path, slots: Sequence[Slot], **spec: Any) -> tuple[AlertDispatcher, Metrics]:
    metrics = Metrics()
    base = {"group_wait_ms": 0, "poll_s": 0.05, "backoff_initial_s": 0.05, "backoff_max_s": 1.0}
    d = AlertDispatcher(DeliverySpec(**{**base, **spec}), slots,
                        lambda: StateStore(tmp / "state.db", group_id="g", instance="alerts"),
                        metrics, source="g", base_url="http://driftloop.test:8080")
    return d, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def outbox_has(db: Path, message_id: str) -> bool:
    """Read the outbox with a connection of the receiver's own: was the row there?"""
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("SELECT 1 FROM alert_outbox WHERE id = ?", (message_id,)).fetchone() is not None
    finally:
        con.close()


def verifying(db: Path, then: Any = None) -> Any:
    """A receiver script: the signature must verify and the message must already be in
    the outbox when it arrives (written before any send); ``then`` picks the answer."""

    def script(req: Request) -> Answer:
        msg_id = standard_webhooks_verify(SECRET, req.headers, req.body)
        assert outbox_has(db, msg_id), f"{msg_id} was sent before it was in the outbox"
        return then(req) if then is not None else Answer(204)

    return script


def alerts_of(req: Request) -> list[tuple[str, str]]:
    return [(a["status"], a["subject"]) for a in json.loads(req.body)["data"]["alerts"]]


def test_an_injected_incident_reaches_a_verifying_receiver_firing_then_resolved(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook(resolve_after=2)
    with Receiver(verifying(tmp_path / "state.db")) as r:
        d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("hook", r.url + "/hook", KEYS))])
        d.start()
        try:
            # Two features fire in one analysis step: one message.
            commit(state, book, [drift("f.age", True, MIN), drift("f.price", True, MIN, psi=0.2)])
            wait_until(lambda: len(r.accepted()) == 1, 10, "the firing message")
            for end in (2 * MIN, 3 * MIN):
                commit(state, book, [drift("f.age", False, end), drift("f.price", True, end)])
            wait_until(lambda: len(r.accepted()) == 2, 10, "the resolved message")
        finally:
            d.stop()
    firing, resolved = r.accepted()
    assert alerts_of(firing) == [("firing", "f.age"), ("firing", "f.price")]
    assert alerts_of(resolved) == [("resolved", "f.age")]
    doc = json.loads(firing.body)["data"]["alerts"][0]
    assert doc["report_url"] == "http://driftloop.test:8080/incidents/feature_drift/ctr/f.age@60000"
    assert doc["facts"]["psi"] == 0.3 and doc["model_version"] == "7"
    assert len(r.requests) == 2  # nothing sent twice
    rows = state.outbox_rows()
    assert all(row.delivered_ms is not None and row.attempts == 1 for row in rows) and len(rows) == 2
    assert sample(metrics, "driftloop_alerts_sent_total", sink="hook") == 2
    assert sample(metrics, "driftloop_alert_outbox_depth", sink="hook") == 0


def test_500_then_429_with_retry_after_then_recovery_delivers_each_alert_exactly_once(
        tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook(resolve_after=1)
    attempts: dict[str, int] = {}

    def flaky(req: Request) -> Answer:
        n = attempts[req.headers["webhook-id"]] = attempts.get(req.headers["webhook-id"], 0) + 1
        if n == 1:
            return Answer(500, body=b"upstream exploded")
        if n == 2:
            return Answer(429, {"Retry-After": "1"})
        return Answer(200)

    with Receiver(verifying(tmp_path / "state.db", flaky)) as r:
        d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("hook", r.url, KEYS))])
        for model in ("ctr", "ranker", "search"):
            commit(state, book, [drift("f.age", True, MIN, model=model)])
        d.start()
        try:
            wait_until(lambda: len(r.accepted()) == 3, 20, "three messages accepted")
            time.sleep(0.3)  # nothing more may arrive
        finally:
            d.stop()
    ids = [q.headers["webhook-id"] for q in r.accepted()]
    assert len(ids) == len(set(ids)) == 3
    assert sorted(attempts.values()) == [3, 3, 3] and len(r.requests) == 9
    # The 429 said 1 s: the next attempt of that id came no sooner.
    for msg_id in ids:
        times = [q.at for q in r.requests if q.headers["webhook-id"] == msg_id]
        assert times[2] - times[1] >= 0.95, times
    # In order: ctr's message was accepted before ranker's was first tried.
    first_try = {i: min(q.at for q in r.requests if q.headers["webhook-id"] == i) for i in ids}
    accepted_at = {q.headers["webhook-id"]: q.at for q in r.accepted()}
    assert first_try[ids[1]] >= accepted_at[ids[0]] and first_try[ids[2]] >= accepted_at[ids[1]]
    assert sample(metrics, "driftloop_alert_attempts_failed_total", sink="hook", reason="http_5xx") == 3
    assert sample(metrics, "driftloop_alert_attempts_failed_total", sink="hook", reason="http_429") == 3
    assert sample(metrics, "driftloop_alerts_sent_total", sink="hook") == 3
    assert {row.attempts for row in state.outbox_rows()} == {3}
    assert all("upstream exploded" not in (row.last_error or "") for row in state.outbox_rows())


class Crash(BaseException):
    """Stands for the process dying between the receiver's 2xx and the outbox update."""


def test_a_send_whose_acknowledgement_was_lost_is_repeated_with_the_same_id(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])
    seen: set[str] = set()

    def dedupe(req: Request) -> Answer:
        seen.add(req.headers["webhook-id"])  # a receiver that remembers ids
        return Answer(200)

    class DiesAfterSending(WebhookSink):
        def send(self, batch: AlertBatch) -> None:
            super().send(batch)
            raise Crash

    with Receiver(verifying(tmp_path / "state.db", dedupe)) as r:
        d1, _ = dispatcher(tmp_path, [Slot(DiesAfterSending("hook", r.url, KEYS))])
        d1.fill(state)
        with pytest.raises(Crash):
            d1.deliver_step(d1.slots[0], state)
        assert [row.delivered_ms for row in state.outbox_rows()] == [None]  # still pending
        d2, _ = dispatcher(tmp_path, [Slot(WebhookSink("hook", r.url, KEYS))])  # "after restart"
        assert d2.fill(state) == 0  # the cursor moved with the first fill
        assert d2.deliver_step(d2.slots[0], state) == 0.0
    assert len(r.requests) == 2 and len(seen) == 1  # sent twice, once by idempotency key
    assert state.outbox_rows()[0].delivered_ms is not None


def test_give_up_after_the_configured_age_is_recorded_and_counted(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])
    with Receiver(lambda _r: Answer(503)) as r:
        d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("hook", r.url, KEYS))],
                                give_up_after_ms=600)
        d.start()
        try:
            wait_until(lambda: any(row.gave_up_ms for row in state.outbox_rows()), 10, "the give-up")
            sent = len(r.requests)
            time.sleep(0.3)
        finally:
            d.stop()
    row = state.outbox_rows()[0]
    assert row.delivered_ms is None and "HTTP 503" in (row.last_error or "")
    assert row.attempts == sent >= 2 and len(r.requests) == sent  # no attempt after giving up
    assert sample(metrics, "driftloop_alerts_given_up_total", sink="hook", reason="age") == 1


def test_a_rejected_payload_is_given_up_at_once_and_does_not_block_the_next(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook()
    commit(state, book, [drift("f.age", True, MIN)])
    commit(state, book, [drift("f.age", True, MIN, model="ranker")])
    answers = iter([Answer(400), Answer(200)])
    with Receiver(lambda _r: next(answers)) as r:
        d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("hook", r.url, KEYS))])
        d.fill(state)
        while d.deliver_step(d.slots[0], state) == 0.0 and len(r.requests) < 2:
            pass
    first, second = state.outbox_rows()
    assert first.gave_up_ms is not None and "rejected" in (first.last_error or "")
    assert second.delivered_ms is not None
    assert sample(metrics, "driftloop_alerts_given_up_total", sink="hook", reason="rejected") == 1


def test_sinks_get_what_their_route_asks_for(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook()
    commit(state, book, [drift("f.age", True, MIN),
                         drift("auc", True, MIN, kind="performance_drop", severity=Severity.CRITICAL)])
    hook = Slot(WebhookSink("hook", "http://127.0.0.1:9/x", KEYS))
    pages = Slot(WebhookSink("pages", "http://127.0.0.1:9/y", KEYS), Route(Severity.CRITICAL))
    perf = Slot(WebhookSink("perf", "http://127.0.0.1:9/z", KEYS),
                Route(Severity.INFO, frozenset({"performance_drop"})))
    nothing = Slot(WebhookSink("quality", "http://127.0.0.1:9/q", KEYS),
                   Route(Severity.INFO, frozenset({"data_quality"})))
    d, _ = dispatcher(tmp_path, [hook, pages, perf, nothing])
    assert d.fill(state) == 3
    got = {row.sink: [i.subject for i in AlertBatch.from_json(row.payload).items]
           for row in state.outbox_rows()}
    assert got == {"hook": ["f.age", "auc"], "pages": ["auc"], "perf": ["auc"]}
    ids = {row.id for row in state.outbox_rows()}
    assert len(ids) == 3  # one idempotency key per (message, sink)


def test_the_fill_is_idempotent_and_moves_its_cursor_by_compare_and_set(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])
    slot = Slot(WebhookSink("hook", "http://127.0.0.1:9/x", KEYS))
    d1, _ = dispatcher(tmp_path, [slot])
    d2, _ = dispatcher(tmp_path, [slot])
    assert d1.fill(state) == 1 and d2.fill(state) == 0
    # A fill that read the cursor before the other moved it changes nothing.
    assert not state.outbox_fill([], cursor_key=CURSOR_KEY, expected=None, upto=99)
    assert state.monitor_value(CURSOR_KEY) == "1" and len(state.outbox_rows()) == 1


def test_transitions_older_than_the_give_up_age_are_counted_not_paged(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])
    time.sleep(0.05)
    d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("hook", "http://127.0.0.1:9/x", KEYS))],
                            give_up_after_ms=10)
    assert d.fill(state) == 0 and state.monitor_value(CURSOR_KEY) == "1"
    assert sample(metrics, "driftloop_alerts_given_up_total", sink="hook", reason="stale") == 1


def _event(seq: int, model: str, incident: str, at_ms: int, transition: str = "firing") -> tuple:
    inc = Incident(id=f"{incident}@1", fingerprint=incident, kind="feature_drift", model=model,
                   subject=incident, severity="warning", status="firing", summary="",
                   opened_ms=1, updated_ms=1)
    return (seq, inc.id, transition, at_ms, inc.to_json())


def test_transitions_of_one_model_within_group_wait_make_one_message() -> None:
    events = [_event(1, "ctr", "a", 1_000), _event(2, "ranker", "x", 1_500),
              _event(3, "ctr", "b", 3_000), _event(4, "ctr", "a", 4_000, "resolved"),
              _event(5, "ctr", "c", 9_000)]
    groups, upto = plan_batches(events, group_wait_ms=5_000, now_ms=20_000)
    assert [[(i.model, i.subject, i.transition) for i in g] for _, g in groups] == [
        [("ctr", "a", "firing"), ("ctr", "b", "firing")],  # a's resolve starts the next one
        [("ranker", "x", "firing")],
        [("ctr", "a", "resolved"), ("ctr", "c", "firing")]]
    assert upto == 5 and [c for c, _ in groups] == [1_000, 1_500, 4_000]
    # Not yet group_wait old: the plan stops before it, the cursor does not pass it.
    groups, upto = plan_batches(events, group_wait_ms=5_000, now_ms=7_000)
    assert upto == 3 and [len(g) for _, g in groups] == [2, 1]
    assert plan_batches(events, group_wait_ms=5_000, now_ms=5_500) == ([], None)
    # group_wait 0: what one analysis step committed together.
    groups, _ = plan_batches(events, group_wait_ms=0, now_ms=20_000)
    assert len(groups) == 5


def test_the_rate_limit_holds_due_messages_back(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    book = IncidentBook()
    for model in ("a", "b", "c"):
        commit(state, book, [drift("f.age", True, MIN, model=model)])
    clock = [0.0]
    with Receiver() as r:
        slot = Slot(WebhookSink("hook", r.url, KEYS),
                    limiter=TokenBucket(6, burst=1, clock=lambda: clock[0]))  # one per 10 s
        d, metrics = dispatcher(tmp_path, [slot])
        d.fill(state)
        assert d.deliver_step(slot, state) == 0.0
        wait = d.deliver_step(slot, state)
        assert 9.9 < wait <= 10.0 and len(r.requests) == 1
        clock[0] = 10.0
        assert d.deliver_step(slot, state) == 0.0 and len(r.requests) == 2
    assert sample(metrics, "driftloop_alerts_rate_limited_total", sink="hook") == 1


def test_a_hanging_sink_does_not_delay_the_others(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    with HangingReceiver() as h, Receiver() as r:
        d, metrics = dispatcher(tmp_path, [Slot(WebhookSink("stuck", h.url, KEYS, timeout_s=30)),
                                           Slot(WebhookSink("ok", r.url, KEYS))])
        d.start()
        try:
            t0 = time.monotonic()
            commit(state, IncidentBook(), [drift("f.age", True, MIN)])
            wait_until(lambda: r.accepted(), 5, "the healthy sink's delivery")
            assert time.monotonic() - t0 < 2.0
            assert h.connections >= 1
        finally:
            d.stop(timeout=0.5)
    assert sample(metrics, "driftloop_alerts_sent_total", sink="ok") == 1


def test_secrets_never_reach_logs_outbox_or_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = "T0001/B0002/SeCrEtToKeN"
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])
    caplog.set_level(logging.DEBUG)
    with Receiver(lambda _r: Answer(500, body=b"echo " + token.encode())) as r:
        d, _ = dispatcher(tmp_path, [Slot(SlackSink("slack", f"{r.url}/services/{token}"), kind="slack")])
        d.fill(state)
        d.deliver_step(d.slots[0], state)
        status = json.dumps(d.status())
    assert r.requests and r.requests[0].path.endswith(token)
    logged = " ".join(f"{rec.getMessage()} {getattr(rec, 'fields', '')}" for rec in caplog.records)
    assert "alert delivery failed" in logged
    for text in (logged, status, state.outbox_rows()[0].last_error or ""):
        assert "SeCrEt" not in text and "echo" not in text


def test_reports_are_archived_through_the_outbox(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.db", group_id="g", instance="a")
    commit(state, IncidentBook(), [drift("f.age", True, MIN)])

    @dataclasses.dataclass
    class MemoryArchive:
        calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
        fail: int = 1

        def archive(self, **kw: Any) -> None:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("registry down")
            self.calls.append(kw)

    archive = MemoryArchive()
    sink = ArchiveSink("mlflow", archive, lambda iid: f"<html>{iid}</html>")
    d, metrics = dispatcher(tmp_path, [Slot(sink, Route(Severity.INFO))])
    d.fill(state)
    assert d.deliver_step(d.slots[0], state) > 0  # the archive was down: retried later
    time.sleep(0.1)
    assert d.deliver_step(d.slots[0], state) == 0.0
    (call,) = archive.calls
    assert call["model"] == "ctr" and call["version"] == "7" and call["transition"] == "firing"
    assert call["html"] == "<html>feature_drift/ctr/f.age@60000</html>"
    assert sample(metrics, "driftloop_alert_attempts_failed_total", sink="mlflow", reason="archive") == 1


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(("sink", "expected"), [
    ({"type": "webhook", "url": "https://x.example/h"}, "needs its signing secret"),
    ({"type": "slack", "url": "https://hooks.example/services/T/B/X"}, "a Slack webhook URL is a secret"),
    ({"type": "webhook", "url": "http://10.0.0.1/h", "secret_env": "S"}, "plain http"),
    ({"type": "alertmanager", "url": "https://am.example", "kinds": ["drift"]}, "unknown kinds"),
    ({"type": "alertmanager"}, "exactly one of url, url_env, url_file"),
    ({"type": "alertmanager", "url": "https://am.example", "secret_env": "S"}, "takes no secret"),
    ({"type": "pagerduty", "secret_env": "K", "rate_limit_per_minute": 0},
     "rate_limit_per_minute must be > 0"),
])
def test_bad_alert_sinks_fail_at_start_up_naming_the_key(tmp_path: Path, sink: dict, expected: str) -> None:
    import yaml

    from monitor.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"alerts": {"sinks": [{"name": "s1", **sink}]}}))
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(cfg, environ={})
    assert "alerts.sinks[0]" in str(info.value) and "/services/T/B/X" not in str(info.value)


def test_a_missing_secret_stops_the_daemon_with_exit_2_naming_the_variable(tmp_path: Path) -> None:
    import yaml

    from tests.test_config import run_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path)}, "http": {"port": 0},
        "alerts": {"sinks": [{"name": "hook", "type": "webhook", "url": "https://x.example/h",
                              "secret_env": "DRIFTLOOP_TEST_NO_SUCH_SECRET"}]}}))
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "alerts.sinks[hook].secret: environment variable DRIFTLOOP_TEST_NO_SUCH_SECRET is not set" \
        in proc.stderr
