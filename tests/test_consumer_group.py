"""The daemon's group consumer against the real broker: how it joins.

kafka-python 3.0 computes the first assignment from the metadata it has at the first
JoinGroup. Without the subscribed topics' partitions in it, that assignment is empty and
the metadata arriving a moment later forces a second rebalance at once, a rejoin that
kafka-python now and then loses: the member is synced on the broker's side, stops
heartbeating and is never assigned anything (4 starts in 25 on a loaded machine; the
cluster and SASL tests hung that way in a full suite run). `make_consumer` reads the
partitions first, so the first rebalance is the only one.
"""

from __future__ import annotations

import time
import uuid

import pytest

from connectors.kafka import Listener, group_joined, make_consumer
from monitor.config import KafkaConfig
from monitor.testbed.local_kafka import create_topics

pytestmark = pytest.mark.kafka


def _join_once(bootstrap: str) -> tuple[list[int], int, bool | None, bool | None]:
    tag = uuid.uuid4().hex[:8]
    topics = [f"p-{tag}", f"f-{tag}"]
    create_topics(bootstrap, dict.fromkeys(topics, 4))
    settings = KafkaConfig(bootstrap_servers=bootstrap, group_id=f"g-{tag}",
                           predictions_topic=topics[0], feedback_topic=topics[1],
                           session_timeout_ms=6000, heartbeat_interval_ms=1000)
    assigned: list[int] = []
    consumer = make_consumer(settings, topics, Listener(lambda _r: None,
                                                        lambda a: assigned.append(len(a))), "i1")
    try:
        before = group_joined(consumer)  # subscribed, not joined yet
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
        for _ in range(5):  # a second rebalance, if one were coming, starts here
            consumer.poll(timeout_ms=200)
        return assigned, len(consumer.assignment()), before, group_joined(consumer)
    finally:
        consumer.close()


def test_a_consumer_on_topics_created_just_before_gets_them_in_its_first_rebalance(
        kafka_bootstrap: str) -> None:
    for _ in range(2):  # without the fix the first assignment is empty every time
        assigned, now, before, after = _join_once(kafka_bootstrap)
        assert assigned and assigned[0] == 8, assigned  # the first assignment has them all
        assert now == 8 and before is False and after is True
