#!/usr/bin/env bash
# Run once by the postgres image's entrypoint, on an empty data directory: one role
# and one database each for MLflow's backend store and driftloop's state store, so
# neither can read or drop the other's tables.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v driftloop_pw="$DRIFTLOOP_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE driftloop LOGIN PASSWORD :'driftloop_pw';
CREATE DATABASE driftloop OWNER driftloop;
SQL
