"""The local Kafka broker is real: records go through it, and survive its restart."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.testbed.local_kafka import LocalKafka, create_topics, unique_topic_name

if TYPE_CHECKING:  # imported by pytest_plugins; importing it first would skip assert rewriting
    from tests.kafka_fixtures import TopicFactory


N = 1000


def produce(bootstrap: str, topic: str, values: Iterable[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for value in values:
            producer.send(topic, key=value.encode(), value=value.encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


def consume(
    bootstrap: str,
    topic: str,
    expected: int,
    *,
    group_id: str | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Reads until ``expected`` records came, then a further moment to catch extras."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    values: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(r.value.decode() for r in records)
        # Anything beyond `expected` would be a duplicate or a stale record.
        for records in consumer.poll(timeout_ms=300).values():
            values.extend(r.value.decode() for r in records)
        if group_id is not None:
            consumer.commit()
    finally:
        consumer.close()
    return values


def test_produce_consume_roundtrip(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory(3)
    sent = [f"m{i}" for i in range(N)]

    produce(kafka_bootstrap, topic, sent)
    got = consume(kafka_bootstrap, topic, N)

    assert sorted(got) == sorted(sent)


def test_topic_factory_makes_distinct_ready_topics(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    a, b = topic_factory(2), topic_factory(5, prefix="other")
    assert a != b and b.startswith("other-")
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(a) == {0, 1}
        assert consumer.partitions_for_topic(b) == set(range(5))
    finally:
        consumer.close()


def test_create_topics_ignores_existing(kafka_bootstrap: str) -> None:
    topic = unique_topic_name()
    create_topics(kafka_bootstrap, {topic: 2})
    create_topics(kafka_bootstrap, {topic: 2})  # no TopicAlreadyExistsError


def test_restart_keeps_records_and_offsets(kafka_broker: LocalKafka) -> None:
    bootstrap = kafka_broker.bootstrap
    topic, group = unique_topic_name(), unique_topic_name("group")
    create_topics(bootstrap, {topic: 2})
    before = [f"before{i}" for i in range(N)]
    produce(bootstrap, topic, before)
    assert sorted(consume(bootstrap, topic, N, group_id=group)) == sorted(before)

    assert kafka_broker.restart() == bootstrap  # same port, same data dir
    assert kafka_broker.is_running()

    # The records are still there...
    assert sorted(consume(bootstrap, topic, N)) == sorted(before)
    # ...and so are the group's committed offsets: it sees only what is new.
    after = [f"after{i}" for i in range(100)]
    produce(bootstrap, topic, after)
    assert sorted(consume(bootstrap, topic, 100, group_id=group)) == sorted(after)

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    try:
        committed = sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in (0, 1))
    finally:
        consumer.close()
    assert committed == N + 100


def test_stop_is_idempotent_and_start_comes_back(kafka_broker: LocalKafka) -> None:
    port = kafka_broker.port
    kafka_broker.stop()
    kafka_broker.stop()
    assert not kafka_broker.is_running()
    with pytest.raises(Exception, match="not running"):
        _ = kafka_broker.bootstrap
    assert kafka_broker.start() == f"127.0.0.1:{port}"


def test_missing_tools_skip_outside_ci_and_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.kafka_fixtures import kafka_unavailable

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="java not found"):
        kafka_unavailable("java not found")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="java not found"):
        kafka_unavailable("java not found")
