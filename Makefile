# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-pg kserve-venv lint bench-serving bench-drift bench-drift-quality bench-quality bench-follow bench-chaos bench-shadow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The KServe Python SDK, for its V2 REST client test (tests/test_v2_clients.py), in a venv of its own:
# it pins pandas<3 and protobuf<7 and pulls kubernetes and grpcio, which our venv must not get.
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed

$(KSERVE_STAMP): tests/kserve/requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q -r tests/kserve/requirements.txt
	touch $(KSERVE_STAMP)

kserve-venv: $(KSERVE_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mlflow_deploy_plugin tests examples benchmarks
	$(BIN)/mypy mlflow_deploy_plugin

PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
# Two workers: most tests wait on processes they start. Units (a file's tests that share a module
# fixture, all Ray tests, any other single test) go out in the order tests/conftest.py sets:
# longest first, so no worker idles at the end while the other runs a long file.
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder --durations=30
# The tests marked `store` (webhooks, drift jobs, the stage-world lifecycle: what the MLflow backend
# changes) once more on a throwaway PostgreSQL server the fixtures start; skipped, saying how to get
# PostgreSQL, when its binaries are missing, except under CI=true. Exit status 5 = PYTEST_ARGS selected none.
PG_PASS = $(PYTEST) $(XDIST) --store postgresql -m store $(PYTEST_ARGS) || [ $$? -eq 5 ]
# In `make test` that pass runs beside the SQLite pass, in one process: its tests mostly wait on the
# lifecycle's clocks (about 40% of one core), so it fits in the SQLite pass's idle time instead of
# adding its minutes after it. Its output is printed when both are done; either failing fails the target.
PG_PASS_BESIDE = $(PYTEST) --durations=15 --store postgresql -m store $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: lint $(KSERVE_STAMP)
	@pg_log=$$(mktemp); ( $(PG_PASS_BESIDE) ) >"$$pg_log" 2>&1 & pg_pid=$$!; \
	$(PYTEST) $(XDIST) $(PYTEST_ARGS); sqlite_rc=$$?; \
	wait $$pg_pid; pg_rc=$$?; \
	echo "==== the tests marked store, again on PostgreSQL (ran beside the pass above) ===="; \
	cat "$$pg_log"; rm -f "$$pg_log"; \
	echo "SQLite pass: exit $$sqlite_rc; PostgreSQL pass: exit $$pg_rc"; \
	[ $$sqlite_rc -eq 0 ] && [ $$pg_rc -eq 0 ]

test-pg: $(STAMP)
	$(PG_PASS)

# In-process tests only (app, batcher, middlewares, spec, CLI, import graph; no deployment): seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/test_units.py $(PYTEST_ARGS)

bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py

# The shadow's cost on the primary's p99 (issue 16): off and on alternating, five on cells per point.
bench-shadow: $(STAMP)
	$(BIN)/python benchmarks/serving.py --shadow --no-peer --no-mlserver --no-nocap --cells 1x1,1x8,1x32 --passes 5 --duration 10

bench-drift: $(STAMP)
	$(BIN)/python benchmarks/drift.py

# Verdict quality on synthetic data with a known truth (false alarms, detection, tiny shifts, nulls).
bench-drift-quality: $(STAMP)
	$(BIN)/python benchmarks/drift_quality.py $(BENCH_ARGS)

# CBPE's accuracy estimate against the realised accuracy under synthetic shifts.
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py $(BENCH_ARGS)

bench-follow: $(STAMP)
	$(BIN)/python benchmarks/follow_latency.py

# kill -9 of each process kind, everything + `mlflow-deploy up`, a hung model, a poison request.
bench-chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(KSERVE_VENV) demo-output
