"""Shared pytest configuration: the real Kafka fixtures live in tests/kafka_fixtures.py."""

pytest_plugins = ["tests.kafka_fixtures"]
