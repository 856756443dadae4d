"""Pytest fixtures that give tests a real Kafka broker (no mock).

Load with ``pytest_plugins = ["tests.kafka_fixtures"]`` (tests/conftest.py or a
test module). Fixtures:

* ``kafka_bootstrap`` (session): the bootstrap address of a broker shared by
  the whole session; ``DRIFTLOOP_TEST_BOOTSTRAP`` names an existing broker
  instead of starting one.
* ``kafka_broker`` (function): a private :class:`LocalKafka`, for tests that
  stop or restart the broker under the daemon.
* ``topic_factory`` (function): creates fresh uuid-named topics on the session
  broker, so that tests sharing it never read each other's records.
* ``secure_kafka`` (session): a second broker, secured (SASL_SSL with SCRAM and
  PLAIN, an mTLS listener, a throwaway CA): a :class:`SecureBroker`. Always started
  here, whatever ``DRIFTLOOP_TEST_BOOTSTRAP`` says; it also needs openssl.

Where java (or, before the first fetch, mvn) is missing, the tests that use
these fixtures are skipped, except under ``CI=true``, where they fail: CI must
never turn green by skipping every Kafka test.

Tests using them get the ``kafka`` marker, so ``-m "not kafka"`` leaves them out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest

from monitor.testbed.local_kafka import (
    KafkaUnavailableError,
    LocalKafka,
    SecureBroker,
    create_topics,
    unique_topic_name,
)

KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "kafka_broker", "topic_factory", "secure_kafka"})

#: make_topic(partitions=1, *, prefix="t", configs=None) -> topic name
TopicFactory = Callable[..., str]


def kafka_unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it under CI=true (where Java and Maven must be present)."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true and no Kafka broker can run: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker can run here: {reason}")


def _start(kafka: LocalKafka) -> str:
    try:
        return kafka.start()
    except KafkaUnavailableError as exc:
        kafka_unavailable(str(exc))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test that uses a Kafka fixture with ``kafka``."""
    for item in items:
        if KAFKA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's broker (started once, stopped at the end).

    One broker for the session because a start costs 1-3 s; tests isolate
    themselves through topic_factory's unique topic names instead.
    """
    external = os.environ.get("DRIFTLOOP_TEST_BOOTSTRAP", "").strip()
    if external:
        yield external
        return
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka-session"))
    bootstrap = _start(kafka)
    try:
        yield bootstrap
    finally:
        kafka.stop()


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A started broker of the test's own, which the test may stop and restart."""
    kafka = LocalKafka(tmp_path / "kafka")
    _start(kafka)
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Returns ``make_topic(partitions=1, *, prefix="t", configs=None) -> name``.

    The topics exist (with a leader per partition) when it returns, and are
    deleted after the test, best effort, so that an external broker named by
    DRIFTLOOP_TEST_BOOTSTRAP does not fill up.
    """
    created: list[str] = []

    def make_topic(
        partitions: int = 1,
        *,
        prefix: str = "t",
        configs: Mapping[str, str] | None = None,
    ) -> str:
        name = unique_topic_name(prefix)
        create_topics(kafka_bootstrap, {name: partitions}, configs=configs)
        created.append(name)
        return name

    yield make_topic

    if created:
        from kafka.admin import KafkaAdminClient

        with contextlib.suppress(Exception):
            admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
            try:
                admin.delete_topics(created, timeout_ms=10_000, raise_errors=False)
            finally:
                admin.close()


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A started SASL_SSL broker of the session (its own, next to ``kafka_bootstrap``'s).

    Separate from the plaintext broker because a DIR keeps the security it was
    formatted with, and the plaintext tests must keep their plaintext broker.
    """
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka-secure"), security="sasl_ssl")
    _start(kafka)
    try:
        yield kafka.secure
    finally:
        kafka.stop()
