# One command sets everything up and runs the demo; one sets everything up and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench clean

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"

demo: install
	$(PYTHON) -m smolora_mlflow run --config configs/demo.yaml

test: install
	$(PYTHON) -m ruff check smolora_mlflow tests benchmarks
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check smolora_mlflow tests benchmarks

bench: install
	$(PYTHON) benchmarks/bench_tracking.py
	$(PYTHON) benchmarks/bench_flavor.py

clean:
	rm -rf outputs mlruns mlartifacts mlflow.db .pytest_cache
