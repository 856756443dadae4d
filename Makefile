# driftloop: `make test` and `make demo` set up everything they need themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
export DRIFTLOOP_CACHE ?= $(CURDIR)/.cache

.PHONY: help venv test test-fast lint kafka-fetch s3-fetch demo bench-quick schemas clean

help:
	@echo "make test   - create $(VENV), install driftloop[test], fetch Kafka, run every test"
	@echo "make demo   - the end-to-end demo (see README)"
	@echo "make lint   - ruff"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

kafka-fetch:
	deploy/kafka/kafka.sh fetch

# S3Proxy (a real S3-compatible server) for the object-store tests (deploy/s3/).
s3-fetch:
	deploy/s3/s3proxy.sh fetch

lint: venv
	$(BIN)/ruff check monitor retrain connectors tests bench

test: venv kafka-fetch s3-fetch lint
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not kafka and not mlflow and not slow"

schemas: venv
	$(BIN)/python -m connectors.schemas

bench-quick: venv kafka-fetch
	$(BIN)/python -m bench.ingest --quick

SEED ?= 1

demo: venv kafka-fetch
	$(BIN)/python -m monitor.demo --seed $(SEED)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache var
