"""No input may stop the daemon: the reproductions of single records and missing topics
that used to crash-loop it, each against the real broker and the real daemon process.

Topics are created the way a team that publishes large events would create them
(``max.message.bytes`` of 10 MiB on the inputs), and records come from an independent
producer as raw bytes. Every test checks the same promise (docs/delivery.md): the
daemon stays up, each valid record is stored once, each rejected one is in the
dead-letter topic once with its reason, and the committed offsets reach the end.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from connectors.kafka import DEAD_LETTER_OVERHEAD, DEFAULT_MAX_MESSAGE_BYTES, REFERENCE_HEAD_BYTES
from monitor.testbed.local_kafka import committed_offsets, create_topics
from tests.daemon_proc import DaemonProcess, end_offsets, read_all, stored_prediction_ids, wait_until
from tests.events_gen import BASE_TS_MS, encode, feedback, prediction

pytestmark = pytest.mark.kafka

TEN_MIB = 10 * 1024 * 1024
GROUP = "driftloop-test"


def _names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {"predictions": f"pred-{tag}", "feedback": f"fb-{tag}", "dead_letter": f"dlq-{tag}"}


def _create(bootstrap: str, names: dict[str, str], roles: tuple[str, ...], *,
            input_max: int | None = TEN_MIB, dlq_max: int | None = None) -> None:
    for role in roles:
        limit = dlq_max if role == "dead_letter" else input_max
        create_topics(bootstrap, {names[role]: 1},
                      configs=None if limit is None else {"max.message.bytes": str(limit)})


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             max_request_size=TEN_MIB + 4096)
    for v in values:
        producer.send(topic, value=v)
    producer.flush(timeout=120)
    producer.close()


def _predictions(start: int, stop: int) -> list[bytes]:
    return [encode(prediction(i, BASE_TS_MS + i * 100)) for i in range(start, stop)]


def _daemon(tmp_path: Path, bootstrap: str, names: dict[str, str], **kafka: Any) -> DaemonProcess:
    return DaemonProcess(tmp_path, bootstrap, names,
                         overrides={"kafka": {"max_message_bytes": 1_048_576, **kafka}})


def _all_committed(bootstrap: str, names: dict[str, str]) -> None:
    for role in ("predictions", "feedback"):
        topic = names[role]
        ends = {p: o for p, o in end_offsets(bootstrap, topic).items() if o}  # an empty one commits nothing
        wait_until(lambda t=topic, e=ends: committed_offsets(bootstrap, GROUP, t) == e, 60,
                   f"committed == end for {topic}")


def _stored(daemon: DaemonProcess, n: int) -> list[str]:
    def check() -> list[str] | None:
        assert daemon.proc is not None and daemon.proc.poll() is None, f"daemon died:\n{daemon.tail()}"
        ids = stored_prediction_ids(daemon.store)
        return ids if len(ids) >= n else None

    return wait_until(check, 120, f"{n} stored predictions")


def _metric(daemon: DaemonProcess, name: str) -> float:
    for line in daemon.get("/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _dead_letters(bootstrap: str, names: dict[str, str], n: int) -> list[Any]:
    return wait_until(lambda: (lambda d: d if len(d) >= n else None)(
        read_all(bootstrap, names["dead_letter"], timeout_s=3)), 60, f"{n} dead letters")


def _headers(message: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in message.headers}


def test_records_too_large_for_the_dead_letter_topic_go_there_as_references(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The 5,000,217-byte record (oversized by the documented rule) and the invalid
    1,048,500-byte one below the limit: both used to crash-loop the daemon in the
    dead-letter producer (MessageSizeTooLargeError), since their copies with headers
    exceed a dead-letter topic of the default size."""
    names = _names()
    _create(kafka_bootstrap, names, ("predictions", "feedback", "dead_letter"))
    huge = encode({**prediction(10_000, BASE_TS_MS), "features": {"blob": "x" * 5_000_000}})
    huge += b" " * (5_000_217 - len(huge))
    invalid = b'{"schema": "prediction/v1", "blob": "' + b"y" * 1_048_400
    invalid += b'"' + b" " * (1_048_500 - len(invalid) - 1)
    assert (len(huge), len(invalid)) == (5_000_217, 1_048_500)
    _produce(kafka_bootstrap, names["predictions"], [*_predictions(0, 200), huge, invalid,
                                                     *_predictions(200, 400)])
    daemon = _daemon(tmp_path, kafka_bootstrap, names).start()
    try:
        daemon.wait_ready()
        ids = _stored(daemon, 400)
        assert sorted(ids) == sorted(f"p-{i}" for i in range(400))
        dead = _dead_letters(kafka_bootstrap, names, 2)
        assert len(dead) == 2, [_headers(m) for m in dead]
        by_offset = {json.loads(m.value)["source"]["offset"]: m for m in dead}
        for offset, raw, reason in ((200, huge, "oversized"), (201, invalid, "malformed_json")):
            m = by_offset[offset]
            headers = _headers(m)
            assert headers["driftloop-reason"] == "too_large_for_dead_letter"
            assert headers["driftloop-original-reason"] == reason
            assert headers["driftloop-source"] == f"{names['predictions']}/0/{offset}"
            ref = json.loads(m.value)
            assert ref["source"] == {"topic": names["predictions"], "partition": 0, "offset": offset}
            assert ref["value_bytes"] == len(raw) and ref["reason"] == reason
            assert base64.b64decode(ref["head_base64"]) == raw[:REFERENCE_HEAD_BYTES]
        _all_committed(kafka_bootstrap, names)
        status = daemon.status()
        assert status is not None
        assert status["dead_letter_references"] == 2
        mismatch = status["topics"]["dead_letter_mismatch"]
        assert f"max.message.bytes={TEN_MIB + DEAD_LETTER_OVERHEAD}" in mismatch["fix"]
        text = daemon.get("/metrics")[1].decode()
        assert f'driftloop_dead_letter_references_total{{topic="{names["predictions"]}"}} 2.0' in text
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def test_a_dead_letter_topic_as_large_as_the_inputs_keeps_every_copy_whole(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    names = _names()
    _create(kafka_bootstrap, names, ("predictions", "feedback"))
    _create(kafka_bootstrap, names, ("dead_letter",), dlq_max=TEN_MIB + DEAD_LETTER_OVERHEAD)
    huge = encode({**prediction(10_000, BASE_TS_MS), "features": {"blob": "x" * 5_000_000}})
    _produce(kafka_bootstrap, names["predictions"], [*_predictions(0, 100), huge, *_predictions(100, 200)])
    daemon = _daemon(tmp_path, kafka_bootstrap, names).start()
    try:
        daemon.wait_ready()
        _stored(daemon, 200)
        dead = _dead_letters(kafka_bootstrap, names, 1)
        assert len(dead) == 1 and dead[0].value == huge
        assert _headers(dead[0])["driftloop-reason"] == "oversized"
        status = daemon.status()
        assert status is not None and "dead_letter_mismatch" not in status["topics"]
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_hostile_records_are_dead_lettered_with_reasons_and_the_rest_stored(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """Deep nesting used to raise RecursionError out of the decoder, and numbers beyond
    int64 an OverflowError: each crash-looped the daemon on one record."""
    names = _names()
    _create(kafka_bootstrap, names, ("predictions", "feedback", "dead_letter"))
    good = prediction(0, BASE_TS_MS)
    bad_preds = [
        (b'{"schema":"prediction/v9","features":' + _nested(5_000) + b"}", "too_deep"),
        (encode({**good, "extra": "x"}).replace(b'"extra":"x"', b'"extra":' + b"[" * 5000 + b"]" * 5000),
         "too_deep"),
        (encode({**good, "ts": 10**30}), "ts_out_of_range"),
        (encode({**good, "ts": 1e300}), "ts_out_of_range"),
        (encode({**good, "rank": 10**30}), "schema_violation"),
    ]
    fb_good = feedback(0, BASE_TS_MS + 40)
    bad_fbs = [
        (b'{"schema":"feedback/v2","x":' + b"[" * 5_000 + b"]" * 5_000 + b"}", "too_deep"),
        (encode({**fb_good, "ts": -(10**30)}), "ts_out_of_range"),
    ]
    # A feature beyond int64 is a valid number: stored as the float it becomes.
    big_feature = encode({**prediction(500, BASE_TS_MS + 500 * 100), "features": {"age": 10**30}})
    _produce(kafka_bootstrap, names["predictions"],
             [*_predictions(0, 250), *(raw for raw, _ in bad_preds), big_feature, *_predictions(250, 500)])
    _produce(kafka_bootstrap, names["feedback"],
             [*(raw for raw, _ in bad_fbs), *(encode(feedback(i, BASE_TS_MS + i * 100 + 40))
                                               for i in range(0, 500, 10))])
    daemon = _daemon(tmp_path, kafka_bootstrap, names).start()
    try:
        daemon.wait_ready()
        ids = _stored(daemon, 501)
        assert sorted(ids) == sorted(f"p-{i}" for i in range(501))
        expected = sorted(r for _, r in [*bad_preds, *bad_fbs])
        dead = _dead_letters(kafka_bootstrap, names, len(expected))
        assert sorted(_headers(m)["driftloop-reason"] for m in dead) == expected
        assert sorted(m.value for m in dead) == sorted(raw for raw, _ in [*bad_preds, *bad_fbs])
        _all_committed(kafka_bootstrap, names)
        assert daemon.get("/healthz")[0] == 200
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


@pytest.mark.parametrize("missing", ["dead_letter", "predictions"])
def test_a_missing_topic_stops_the_start_with_exit_2_naming_it(
        kafka_bootstrap: str, tmp_path: Path, missing: str) -> None:
    """It used to block the main loop for a minute in the producer's metadata wait at
    the first invalid record and exit 1 (the dead-letter topic), or run 'ready' with
    nothing assigned and 18 log lines a second (an input topic)."""
    names = _names()
    _create(kafka_bootstrap, names, tuple(r for r in names if r != missing))
    daemon = _daemon(tmp_path, kafka_bootstrap, names).start()
    try:
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=60) == 2, daemon.tail()
        log = daemon.tail(200)
        assert names[missing] in log and "kafka.create_topics" in log
    finally:
        daemon.stop_quietly()


def test_create_topics_creates_them_with_a_dead_letter_topic_that_fits_the_inputs(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    names = _names()
    _create(kafka_bootstrap, names, ("predictions",))
    daemon = _daemon(tmp_path, kafka_bootstrap, names, create_topics=True).start()
    try:
        daemon.wait_ready()
        status = daemon.status()
        assert status is not None
        assert sorted(status["topics"]["created"]) == sorted([names["feedback"], names["dead_letter"]])
        limits = status["topics"]["max_message_bytes"]
        assert limits[names["predictions"]] == TEN_MIB
        assert limits[names["dead_letter"]] == TEN_MIB + DEAD_LETTER_OVERHEAD
        assert limits[names["feedback"]] == DEFAULT_MAX_MESSAGE_BYTES  # the broker's default
        _produce(kafka_bootstrap, names["predictions"], [*_predictions(0, 50), b"not json"])
        _stored(daemon, 50)
        dead = _dead_letters(kafka_bootstrap, names, 1)
        assert [m.value for m in dead] == [b"not json"]
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def test_a_deleted_dead_letter_topic_is_retried_until_it_is_back(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """A failure of the broker's side stops ingestion as a retried checkpoint, never as
    an exit: nothing after the rejected record is stored before its dead letter is safe."""
    names = _names()
    _create(kafka_bootstrap, names, ("predictions", "feedback", "dead_letter"))
    daemon = _daemon(tmp_path, kafka_bootstrap, names).start()
    try:
        daemon.wait_ready()
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics([names["dead_letter"]], timeout_ms=10_000)
        finally:
            admin.close()
        _produce(kafka_bootstrap, names["predictions"], [*_predictions(0, 100), b"not json",
                                                         *_predictions(100, 200)])

        def failing() -> bool:
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.tail()
            return _metric(daemon, "driftloop_ingest_failures_total") >= 2

        wait_until(failing, 90, "ingestion retrying against the missing dead-letter topic")
        assert daemon.get("/healthz")[0] in (200, 503)  # answering: the loop is not blocked
        assert len(stored_prediction_ids(daemon.store)) <= 100
        create_topics(kafka_bootstrap, {names["dead_letter"]: 1})
        ids = _stored(daemon, 200)
        assert sorted(ids) == sorted(f"p-{i}" for i in range(200))
        dead = _dead_letters(kafka_bootstrap, names, 1)
        assert [m.value for m in dead] == [b"not json"]
        _all_committed(kafka_bootstrap, names)
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()


def test_readyz_is_not_ready_without_an_assignment(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Two daemons on one-partition topics: the one with nothing assigned says so, and
    becomes ready when the other stops and its partitions move."""
    names = _names()
    _create(kafka_bootstrap, names, ("predictions", "feedback", "dead_letter"))
    group = f"g-{uuid.uuid4().hex[:8]}"
    daemons = [DaemonProcess(tmp_path / f"d{i}", kafka_bootstrap, names, instance=f"d{i}", group=group)
               for i in (1, 2)]
    for d in daemons:
        d.start()
    try:
        def one_ready() -> list[DaemonProcess] | None:
            codes = [d.get("/readyz") for d in daemons]
            ready = [d for d, (code, _) in zip(daemons, codes, strict=True) if code == 200]
            others = [body for code, body in codes if code != 200]
            if len(ready) == 1 and others and b"no partition assigned" in others[0]:
                return ready
            return None

        ready = wait_until(one_ready, 90, "one daemon ready and the other not assigned")
        idle = next(d for d in daemons if d is not ready[0])
        status = idle.status()
        assert status is not None and status["assignment"] == []
        assert ready[0].terminate() == 0
        wait_until(lambda: idle.get("/readyz")[0] == 200, 90, "the idle daemon to take over")
        assert idle.terminate() == 0
    finally:
        for d in daemons:
            d.stop_quietly()
