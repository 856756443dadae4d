"""Shared pytest configuration: the real Kafka fixtures live in tests/kafka_fixtures.py, the real
MLflow server and PostgreSQL in tests/mlflow_fixtures.py, a real S3-compatible server in
tests/s3_fixtures.py."""

pytest_plugins = ["tests.kafka_fixtures", "tests.mlflow_fixtures", "tests.s3_fixtures"]
