"""Shared pytest configuration: the real Kafka fixtures live in tests/kafka_fixtures.py, the real
MLflow server and PostgreSQL in tests/mlflow_fixtures.py."""

pytest_plugins = ["tests.kafka_fixtures", "tests.mlflow_fixtures"]
