"""The daemon against a real Kafka broker: delivery, crashes, broker outages, scale-out.

Every test gets uuid-named topics, its own consumer group and its own data directory.
Event times are synthetic (100 ms apart) so window boundaries do not depend on how
fast the machine is.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path

import pytest

from monitor.testbed.local_kafka import committed_offsets, create_topics
from tests.daemon_proc import (
    DaemonProcess,
    end_offsets,
    produce,
    read_all,
    stored_prediction_ids,
    wait_until,
)
from tests.events_gen import BASE_TS_MS, bad_predictions, encode, feedback, prediction

pytestmark = pytest.mark.kafka


def new_topics(bootstrap: str, partitions: int = 1) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    topics = {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}
    create_topics(bootstrap, {topics["predictions"]: partitions, topics["feedback"]: partitions,
                              topics["dead_letter"]: 1})
    return topics


def predictions(start: int, stop: int) -> list[bytes]:
    return [encode(prediction(i, BASE_TS_MS + i * 100)) for i in range(start, stop)]


def assert_exactly_once(ids: list[str], n: int) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events stored twice"
    missing = {f"p-{i}" for i in range(n)} - set(ids)
    assert not missing, f"{len(missing)} events missing, e.g. {sorted(missing)[:5]}"
    assert len(ids) == n


def wait_stored(n: int, timeout: float, *daemons: DaemonProcess) -> list[str]:
    def check() -> list[str] | None:
        for d in daemons:
            assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.tail()}"
        ids = stored_prediction_ids(daemons[0].store)
        return ids if len(ids) >= n else None

    return wait_until(check, timeout, f"{n} stored predictions")


def test_valid_events_stored_once_and_bad_ones_dead_lettered_with_reasons(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, partitions=2)
    n = 4_000
    bad = bad_predictions(8192)
    values = predictions(0, n)
    rng = random.Random(7)
    positions = sorted(rng.sample(range(n), len(bad)))
    mixed = list(values)
    for pos, (raw, _) in zip(reversed(positions), reversed(bad), strict=True):
        mixed.insert(pos, raw)
    produce(kafka_bootstrap, topics["predictions"], mixed)
    produce(kafka_bootstrap, topics["feedback"],
            [encode(feedback(i, BASE_TS_MS + i * 100 + 40)) for i in range(0, n, 10)]
            + [b'{"schema":"feedback/v1"}'])

    daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics).start()
    try:
        daemon.wait_ready()
        ids = wait_stored(n, 90, daemon)
        assert_exactly_once(ids, n)
        fb = wait_until(lambda: daemon.store.read("feedbacks").num_rows >= n // 10 or None, 30,
                        "stored feedback")
        assert fb is True or fb
        assert daemon.store.read("feedbacks").num_rows == n // 10

        dead = read_all(kafka_bootstrap, topics["dead_letter"])
        reasons = sorted(dict(m.headers)["driftloop-reason"].decode() for m in dead)
        assert reasons == sorted([r for _, r in bad] + ["schema_violation"])
        for m in dead:
            headers = dict(m.headers)
            src_topic, _, _ = headers["driftloop-source"].decode().rsplit("/", 2)
            assert src_topic in (topics["predictions"], topics["feedback"])
            assert headers["driftloop-error"]
        raw_bad = [*sorted(raw for raw, _ in bad), b'{"schema":"feedback/v1"}']
        assert sorted(m.value for m in dead) == sorted(raw_bad), "DLQ must keep the raw bytes"

        for topic in (topics["predictions"], topics["feedback"]):
            ends = end_offsets(kafka_bootstrap, topic)
            wait_until(lambda t=topic, e=ends: committed_offsets(
                kafka_bootstrap, "driftloop-test", t) == e, 30, f"committed == end for {topic}")

        code, metrics = daemon.get("/metrics")
        assert code == 200
        text = metrics.decode()
        oversized = f'reason="oversized",topic="{topics["predictions"]}"'
        assert f"driftloop_dead_letter_total{{{oversized}}} 1.0" in text
        assert "driftloop_consumer_lag{" in text
        assert "driftloop_kafka_commit_seconds_count" in text
        assert daemon.get("/healthz")[0] == 200
        status = daemon.status()
        assert status is not None
        assert status["events_stored"][topics["predictions"]] == n
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, partitions=4)
    n = 200_000
    rng = random.Random(20261125)
    producer = threading.Thread(
        target=lambda: [produce(kafka_bootstrap, topics["predictions"], predictions(a, a + 20_000))
                        for a in range(0, n, 20_000)] and None)
    producer.start()
    daemon = DaemonProcess(tmp_path, kafka_bootstrap, topics,
                           overrides={"checkpoint": {"interval_seconds": 0.3}})
    kills = 0
    try:
        daemon.start()
        for _ in range(6):
            time.sleep(rng.uniform(1.0, 4.0))
            daemon.kill9()
            kills += 1
            daemon.start()
        producer.join()
        ids = wait_stored(n, 240, daemon)
        assert_exactly_once(ids, n)
        assert kills == 6
        time.sleep(2)  # nothing arrives late
        assert_exactly_once(stored_prediction_ids(daemon.store), n)
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
        producer.join(timeout=1)


def test_broker_restart_mid_stream_loses_nothing(kafka_broker, tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap
    topics = new_topics(bootstrap, partitions=2)
    n = 20_000
    produce(bootstrap, topics["predictions"], predictions(0, n // 2))
    daemon = DaemonProcess(tmp_path, bootstrap, topics).start()
    try:
        daemon.wait_ready()
        wait_until(lambda: (s := daemon.status()) and s["events_in"].get(topics["predictions"], 0)
                   >= n // 4, 60, "first events consumed")
        kafka_broker.stop()
        time.sleep(4)
        assert daemon.proc is not None and daemon.proc.poll() is None, "daemon died without broker"
        kafka_broker.start()
        produce(bootstrap, topics["predictions"], predictions(n // 2, n))
        ids = wait_stored(n, 120, daemon)
        assert_exactly_once(ids, n)
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def test_two_daemons_share_partitions_and_store_each_event_once(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    topics = new_topics(kafka_bootstrap, partitions=4)
    n = 40_000
    shared = tmp_path / "shared"
    a = DaemonProcess(tmp_path / "a", kafka_bootstrap, topics, instance="a", shared_dir=shared)
    b = DaemonProcess(tmp_path / "b", kafka_bootstrap, topics, instance="b", shared_dir=shared)
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()

        def both_assigned() -> bool:
            sa, sb = a.status(), b.status()
            return bool(sa and sb and sa["assignment"] and sb["assignment"])

        wait_until(both_assigned, 60, "both daemons to own partitions")
        sa, sb = a.status(), b.status()
        assert sa and sb
        assert not set(sa["assignment"]) & set(sb["assignment"])
        assert len(sa["assignment"]) + len(sb["assignment"]) == 8
        produce(kafka_bootstrap, topics["predictions"], predictions(0, n))
        ids = wait_stored(n, 120, a, b)
        assert_exactly_once(ids, n)
        stored_by = {i: json.loads(json.dumps(s["events_stored"])) for i, s in
                     (("a", a.status()), ("b", b.status()))}
        assert stored_by["a"].get(topics["predictions"], 0) > 0
        assert stored_by["b"].get(topics["predictions"], 0) > 0
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        a.stop_quietly()
        b.stop_quietly()
