"""What tests, benchmarks and the demo run driftloop against, never the product itself:
local Kafka and MLflow servers (started from deploy/) and the simulated world of users
and a recommender.
"""
