"""Alert delivery inside the real daemon (``driftloop run`` as a child process, a real
Kafka broker): alerts undelivered when the process is killed with SIGKILL are delivered
after the restart, once each, and link to a report the daemon serves; and a receiver
that hangs does not slow ingestion.

Incidents are injected into the daemon's state store by the test, through the same
`StateStore.commit_monitor` call the analysis stage uses, while the daemon runs: the
path from the incident log to the receiver is the daemon's own. (The path from events
to incidents is tests/test_monitor_kafka.py's.)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from connectors.kafka_local import create_topics
from connectors.state import StateStore
from monitor.incidents import IncidentBook
from tests.daemon_proc import DaemonProcess, produce, wait_until
from tests.events_gen import BASE_TS_MS, encode, prediction
from tests.receivers import Answer, HangingReceiver, Receiver, Request, standard_webhooks_verify
from tests.test_alerting import MIN, SECRET, commit, drift, outbox_has

pytestmark = pytest.mark.kafka

SECRET_ENV = "DRIFTLOOP_TEST_WEBHOOK_SECRET"


def new_topics(bootstrap: str, partitions: int = 1) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(bootstrap, {topics["predictions"]: partitions, topics["feedback"]: 1,
                              topics["dead_letter"]: 1})
    return topics


def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": url, "secret_env": SECRET_ENV, **extra}


FAST = {"group_wait_seconds": 0, "poll_seconds": 0.2, "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1}


def test_alerts_undelivered_at_sigkill_are_delivered_once_after_restart(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    db = tmp_path / "state.db"
    up = {"value": False}

    def script(req: Request) -> Answer:
        msg_id = standard_webhooks_verify(SECRET, req.headers, req.body)
        assert outbox_has(db, msg_id), f"{msg_id} sent before it was in the outbox"
        return Answer(204) if up["value"] else Answer(503, body=b"down for maintenance")

    topics = new_topics(kafka_bootstrap)
    with Receiver(script) as r:
        daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics, overrides={
            "alerts": {"sinks": [webhook("oncall", r.url + "/hook")], **FAST}})
        daemon.start()
        try:
            daemon.wait_ready()
            state = StateStore(db, group_id="driftloop-test", instance="test")
            book = IncidentBook(resolve_after=1)
            for model in ("ctr", "ranker", "search"):
                commit(state, book, [drift("f.age", True, MIN, model=model),
                                     drift("f.price", True, MIN, model=model, psi=0.2)])

            def tried() -> bool:
                # A sink's messages go out in order: the first is retried, the rest wait.
                rows = state.outbox_rows()
                return len(rows) == 3 and rows[0].attempts >= 2

            wait_until(tried, 30, "the messages enqueued and retried against the failing receiver")
            daemon.kill9()
            assert all(row.delivered_ms is None for row in state.outbox_rows())
            assert not r.accepted()

            up["value"] = True
            daemon.start()
            wait_until(lambda: len(r.accepted()) >= 3, 60, "delivery after the restart")
            time.sleep(1.0)  # nothing more may arrive
            status = daemon.status()
            code, metrics = daemon.get("/metrics")
            accepted = r.accepted()
            report_url = json.loads(accepted[0].body)["data"]["alerts"][0]["report_url"]
            with urllib.request.urlopen(report_url, timeout=10) as resp:
                page = resp.read().decode()
                csp = resp.headers["Content-Security-Policy"]
            assert daemon.terminate() == 0
        finally:
            daemon.stop_quietly()

    ids = [q.headers["webhook-id"] for q in accepted]
    assert len(ids) == len(set(ids)) == 3, ids
    assert {row.id for row in state.outbox_rows()} == set(ids)
    assert all(row.delivered_ms is not None for row in state.outbox_rows())
    subjects = [[a["subject"] for a in json.loads(q.body)["data"]["alerts"]] for q in accepted]
    assert subjects == [["f.age", "f.price"]] * 3  # one message per model, grouped
    assert report_url.startswith(f"http://127.0.0.1:{daemon.port}/incidents/feature_drift/")
    assert "<svg" in page and "f.age" in page and "script-src" not in csp and "default-src 'none'" in csp
    assert status is not None and status["alerts"]["sinks"]["oncall"]["url"] == r.url + "/..."
    assert code == 200 and b'driftloop_alerts_sent_total{sink="oncall"} 3.0' in metrics
    log = daemon.log_path.read_text()
    secret_key = SECRET.removeprefix("whsec_")
    assert secret_key not in log and "down for maintenance" not in log


# -- a hanging receiver and ingestion throughput ---------------------------------------------

#: Events per run, and interleaved (baseline, hanging) pairs. Sized for ~5 s of
#: consumption per run on the 2-core development machine.
EVENTS = int(os.environ.get("DRIFTLOOP_TEST_THROUGHPUT_EVENTS", "300000"))
PAIRS = int(os.environ.get("DRIFTLOOP_TEST_THROUGHPUT_PAIRS", "3"))
_EVENTS_IN = re.compile(rb'^driftloop_events_in_total\{topic="([^"]+)"\} ([0-9.e+]+)$', re.M)


def _consumption_rate(daemon: DaemonProcess, topic: str, n: int) -> float:
    """Events/s between 10% and 100% of ``n`` consumed, from the daemon's own counter
    sampled every 20 ms (interpolated between samples), so start-up is not in it."""
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        code, body = daemon.get("/metrics")
        t = time.perf_counter()
        if code == 200:
            got = {m.group(1).decode(): float(m.group(2)) for m in _EVENTS_IN.finditer(body)}
            samples.append((t, got.get(topic, 0.0)))
            if samples[-1][1] >= n:
                break
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
        time.sleep(0.02)
    else:
        raise AssertionError(f"{n} events not consumed in time: {samples[-1:]}")

    def crossing(level: float) -> float:
        for (t0, v0), (t1, v1) in itertools.pairwise(samples):
            if v1 >= level > v0:
                return t0 + (t1 - t0) * (level - v0) / (v1 - v0)
        return samples[0][0]

    lo = 0.1 * n
    return (n - lo) / (crossing(n) - crossing(lo))


def _run(kafka_bootstrap: str, workdir: Path, topics: dict[str, str], sinks: list[dict[str, Any]]) -> float:
    # A fresh consumer group reads the topic from the start; the same incidents wait in
    # both kinds of run; only the sinks differ.
    group = f"tp-{uuid.uuid4().hex[:8]}"
    state = StateStore(workdir / "state.db", group_id=group, instance="test")
    book = IncidentBook()
    for k in range(20):
        commit(state, book, [drift("f.age", True, MIN, model=f"model-{k}")])
    state.close()
    daemon = DaemonProcess(workdir, kafka_bootstrap, topics, group=group, overrides={
        "checkpoint": {"interval_seconds": 1.0},
        "windows": {"size_seconds": 60, "allowed_lateness_seconds": 30, "idle_timeout_seconds": 60},
        "monitor": {"bootstrap_seconds": 3600},
        "alerts": {"sinks": sinks, "group_wait_seconds": 0}})
    daemon.start()
    try:
        daemon.wait_ready()
        rate = _consumption_rate(daemon, topics["predictions"], EVENTS)
        if sinks:
            status = daemon.status() or {}
            # The hanging sinks really were being tried during the measurement.
            assert all(s["pending"] == 20 for s in status["alerts"]["sinks"].values()), status
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    return rate


@pytest.mark.slow
def test_a_hanging_receiver_does_not_slow_ingestion(kafka_bootstrap: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    topics = new_topics(kafka_bootstrap, partitions=4)
    produce(kafka_bootstrap, topics["predictions"],
            (encode(prediction(i, BASE_TS_MS + i)) for i in range(EVENTS)))
    base: list[float] = []
    hang: list[float] = []
    with HangingReceiver() as h1, HangingReceiver() as h2, HangingReceiver() as h3:
        sinks = [webhook(f"hang{i}", h.url, timeout_seconds=5, rate_limit_per_minute=600)
                 for i, h in enumerate((h1, h2, h3))]
        for k in range(PAIRS):
            # Interleaved, so that drift in the shared machine's load hits both alike.
            base.append(_run(kafka_bootstrap, tmp_path / f"base{k}", topics, []))
            hang.append(_run(kafka_bootstrap, tmp_path / f"hang{k}", topics, sinks))
        connections = h1.connections + h2.connections + h3.connections
    ratio = statistics.median(hang) / statistics.median(base)
    spread = (max(base) - min(base)) / statistics.median(base)
    print(f"\nthroughput, events/s: baseline {[round(x) for x in base]} (spread {spread:.1%}), "
          f"hanging receivers {[round(x) for x in hang]}; median ratio {ratio:.3f}; "
          f"{connections} connections left hanging")
    assert connections >= 3 * PAIRS  # every hanging run had its sinks stuck in a send
    assert ratio >= 0.95, (base, hang)
