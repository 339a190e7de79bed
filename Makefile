# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-serving bench-drift bench-follow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mlflow_deploy_plugin tests examples benchmarks

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py

bench-drift: $(STAMP)
	$(BIN)/python benchmarks/drift.py

bench-follow: $(STAMP)
	$(BIN)/python benchmarks/follow_latency.py

clean:
	rm -rf $(VENV) demo-output
