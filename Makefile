# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench-serving bench-drift bench-follow clean

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

typecheck: lint

# In-process tests only (app, batcher, spec, CLI, import graph): seconds, no processes started.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py

bench-drift: $(STAMP)
	$(BIN)/python benchmarks/drift.py

clean:
	rm -rf $(VENV) demo-output
