"""driftloop connectors: every edge that does I/O (Kafka, storage, state, HTTP, MLflow)."""
