# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-serving bench-drift bench-drift-quality bench-follow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mlflow_deploy_plugin tests examples benchmarks
	$(BIN)/mypy mlflow_deploy_plugin

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# In-process tests only (app, batcher, middlewares, spec, CLI, import graph; no deployment): seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/test_units.py $(PYTEST_ARGS)

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py

bench-drift: $(STAMP)
	$(BIN)/python benchmarks/drift.py

# Verdict quality on synthetic data with a known truth (false alarms, detection, tiny shifts, nulls).
bench-drift-quality: $(STAMP)
	$(BIN)/python benchmarks/drift_quality.py $(BENCH_ARGS)

bench-follow: $(STAMP)
	$(BIN)/python benchmarks/follow_latency.py

clean:
	rm -rf $(VENV) demo-output
