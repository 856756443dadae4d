"""No stage may wait for itself, and a stage that cannot move is paged, through the real
daemon and broker.

* A model version whose traffic has a gap right where its bootstrap period ends used to
  freeze drift analysis of every model for good: the summary of the window after the
  gap waited for a reference that only deciding that very window would bootstrap.
* A prediction segment lost from the store (registered, its file gone) used to stop
  the label join silently: /status showed no error and nothing paged. Now the stage is
  reported stalled: /readyz degrades, and a critical ``monitor_stalled`` incident
  pages, then resolves once the file is back and the stage moves again.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from connectors.state import StateStore
from monitor.testbed.local_kafka import create_topics
from tests.daemon_proc import DaemonProcess, produce, wait_until
from tests.events_gen import BASE_TS_MS, encode, feedback, prediction
from tests.receivers import Answer, Receiver

pytestmark = pytest.mark.kafka

SEC = 1000
SECRET_ENV = "DRIFTLOOP_TEST_STALL_SECRET"
WINDOWS = {"size_seconds": 1, "allowed_lateness_seconds": 0, "idle_timeout_seconds": 2}


def _topics(bootstrap: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(bootstrap, {t: 1 for t in topics.values()})
    return topics


def _events(model: str, version: str, seconds: range, per_second: int, offset: int) -> list[bytes]:
    out = []
    for s in seconds:
        for j in range(per_second):
            i = offset + s * per_second + j
            ts = BASE_TS_MS + s * SEC + j * (SEC // per_second)
            out.append((ts, encode({**prediction(i, ts), "model": model, "model_version": version})))
    return [v for _, v in sorted(out)]


def _pointer(status: dict[str, Any] | None, key: str) -> int:
    import datetime as dt

    value = ((status or {}).get("monitor") or {}).get(key)
    return 0 if value is None else int(dt.datetime.fromisoformat(value).timestamp() * 1000) - BASE_TS_MS


def test_a_gap_at_the_end_of_a_bootstrap_period_stops_no_model(kafka_bootstrap: str,
                                                               tmp_path: Path) -> None:
    topics = _topics(kafka_bootstrap)
    # A quiet spell from 20 s to 40 s, for every model. The canary starts 2 s before it,
    # so its 15 s bootstrap period ends inside it: the first window it could be
    # bootstrapped at is the first one after the spell.
    steady = _events("steady", "1", range(0, 20), 100, 0) + _events("steady", "1", range(40, 70), 100, 0)
    canary = (_events("canary", "1", range(18, 20), 100, 100_000)
              + _events("canary", "1", range(40, 70), 100, 100_000))
    values = sorted(steady + canary, key=lambda b: json.loads(b)["ts"])
    daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics, overrides={
        "windows": WINDOWS,
        "monitor": {"label_types": ["click"], "attribution_seconds": 3, "bootstrap_seconds": 15,
                    "bootstrap_min_rows": 200, "resolve_after": 2, "labels_stall_seconds": 600},
    })
    daemon.start()
    try:
        daemon.wait_ready()
        produce(kafka_bootstrap, topics["predictions"], values)

        def analysed() -> dict[str, Any] | None:
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
            status = daemon.status()
            return status if _pointer(status, "drift_upto") >= 60 * SEC else None

        status = wait_until(analysed, 120, "drift analysis past the canary's gap")
        refs = status["monitor"]["references"]
        assert refs["steady@1"].startswith("bootstrap:")
        assert refs["canary@1"].startswith("bootstrap:")
        assert status["monitor"]["stalled"] == {}
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    state = StateStore(tmp_path / "state.db", group_id="driftloop-test", instance="probe")
    ref = json.loads(state.monitor_value("ref/canary@1") or "{}")
    # Built from the traffic the canary had, on both sides of the gap: 2 s before it and
    # the first window after it.
    assert ref["source"].startswith("bootstrap:300 rows"), ref["source"]
    version = json.loads(state.monitor_value("version/canary@1") or "{}")
    assert version["first_window"] == BASE_TS_MS + 18 * SEC and version["decider"] is not None
    state.close()


def _alerts(hook: Receiver) -> list[tuple[str, str]]:
    """(fingerprint, transition) of every alert the webhook received."""
    return [(a["fingerprint"], a["transition"]) for r in list(hook.requests)
            for a in json.loads(r.body)["data"]["alerts"]]


def _segment_files(tmp_path: Path, topic: str, start_ms: int) -> list[Path]:
    state = StateStore(tmp_path / "state.db", group_id="driftloop-test", instance="probe")
    try:
        return [Path(s.path) for s in state.segments_of_window(topic, start_ms)]
    finally:
        state.close()


def test_a_stage_that_cannot_move_pages_and_resolves_when_it_moves_again(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")
    topics = _topics(kafka_bootstrap)
    rate = 200

    def stream(seconds: range) -> tuple[list[bytes], list[bytes]]:
        preds, fbs = [], []
        for s in seconds:
            for j in range(rate):
                i = s * rate + j
                ts = BASE_TS_MS + s * SEC + j * (SEC // rate)
                preds.append(encode(prediction(i, ts)))
                if i % 7 == 0:
                    fbs.append(encode(feedback(i, ts + 500)))
        return preds, fbs

    with Receiver(lambda _r: Answer(204)) as hook:
        daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics, overrides={
            "windows": WINDOWS,
            "monitor": {"label_types": ["click"], "attribution_seconds": 3, "bootstrap_seconds": 5,
                        "bootstrap_min_rows": 100, "bootstrap_min_labels": 5, "resolve_after": 2,
                        "labels_stall_seconds": 600, "stall_seconds": 3},
            "alerts": {"sinks": [{"name": "oncall", "type": "webhook", "url": hook.url + "/hook",
                                  "secret_env": SECRET_ENV, "allow_http": True,
                                  "min_severity": "critical"}],
                       "group_wait_seconds": 0, "poll_seconds": 0.2},
        })
        daemon.start()
        try:
            daemon.wait_ready()
            preds, fbs = stream(range(20))
            produce(kafka_bootstrap, topics["predictions"], preds)
            produce(kafka_bootstrap, topics["feedback"], fbs)
            wait_until(lambda: _pointer(daemon.status(), "drift_upto") >= 18 * SEC, 90,
                       "drift analysis of the first 18 s")
            # Window 17 s is analysed for drift; its labels are not mature yet (the feedback
            # has not moved 3 s past it). Its file goes missing.
            lost = _segment_files(tmp_path, topics["predictions"], BASE_TS_MS + 17 * SEC)
            assert lost and _pointer(daemon.status(), "join_upto") <= 17 * SEC
            aside = tmp_path / "aside"
            aside.mkdir()
            for f in lost:
                shutil.move(f, aside / f.name)
            preds, fbs = stream(range(20, 40))
            produce(kafka_bootstrap, topics["predictions"], preds)
            produce(kafka_bootstrap, topics["feedback"], fbs)

            def stalled() -> bool:
                assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
                code, body = daemon.get("/readyz")
                return code == 503 and b"degraded: join analysis has made no progress" in body

            wait_until(stalled, 90, "the join stage reported stalled")
            status = daemon.status() or {}
            firing = {i["fingerprint"]: i for i in status["incidents"]["firing"]}
            assert "monitor_stalled/*/join" in firing, status["incidents"]
            assert firing["monitor_stalled/*/join"]["severity"] == "critical"
            assert "monitor_stalled/*/drift" not in firing  # drift moved on meanwhile
            assert "driftloop_stage_stalled{stage=\"join\"} 1.0" in daemon.get("/metrics")[1].decode()
            wait_until(lambda: ("monitor_stalled/*/join", "firing") in _alerts(hook), 30, "the page")

            for f in lost:
                shutil.move(aside / f.name, f)
                os.utime(f)

            def resolved() -> bool:
                status = daemon.status() or {}
                done = {i["fingerprint"] for i in status["incidents"]["recently_resolved"]}
                return "monitor_stalled/*/join" in done and daemon.get("/readyz")[0] == 200

            wait_until(resolved, 90, "the stall resolved once the join moved again")
            assert _pointer(daemon.status(), "join_upto") > 18 * SEC
            wait_until(lambda: ("monitor_stalled/*/join", "resolved") in _alerts(hook), 30,
                       "the resolve notification")
            assert ("monitor_stalled/*/drift", "firing") not in _alerts(hook)
            assert daemon.terminate() == 0
        finally:
            daemon.stop_quietly()
