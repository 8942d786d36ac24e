# Everything sets itself up: the first target that needs the virtualenv makes it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false

PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
# Flow runs one worker takes at a time: several workers then share a pool's runs.
WORKER_LIMIT ?= 4

.PHONY: demo test unit lint bench sim server deploy worker serve cluster-up cluster-down clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed ## The main job: topic to MP4 on the simulator and Prefect's embedded server.
	$(PY) -m sora2.demo

# Three pytest processes side by side, each reporting in turn: the end-to-end tests
# (tests/e2e) and the two soaks mostly wait (on servers, workers, crash detection, and
# on the embedded SQLite server's lock waits: see README "Tests"), so they run beside
# the rest; the soaks get a test harness of their own, whose stalls then stop no other test.
SOAKS := tests/prefect/test_soak.py tests/prefect/test_concurrency_soak.py
test: lint $(VENV)/.installed ## Lint, type-check, then the whole test suite.
	@e2e_log=$$(mktemp); soak_log=$$(mktemp); side_tmp=$$(mktemp -d); \
	$(PY) -m pytest tests/e2e -p no:cacheprovider --basetemp="$$side_tmp/e2e" >"$$e2e_log" 2>&1 & e2e=$$!; \
	$(PY) -m pytest $(SOAKS) -p no:cacheprovider --basetemp="$$side_tmp/soak" >"$$soak_log" 2>&1 & soak=$$!; \
	$(PY) -m pytest --ignore=tests/e2e $(addprefix --ignore=,$(SOAKS)); rest=$$?; \
	wait $$soak; soak_rc=$$?; wait $$e2e; e2e_rc=$$?; \
	echo "=== the soaks (run beside the rest) ==="; cat "$$soak_log"; \
	echo "=== tests/e2e (run beside the rest) ==="; cat "$$e2e_log"; \
	rm -rf "$$e2e_log" "$$soak_log" "$$side_tmp"; \
	test $$rest -eq 0 && test $$soak_rc -eq 0 && test $$e2e_rc -eq 0

unit: $(VENV)/.installed ## The tests that need no Prefect server (seconds).
	$(PY) -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed ## Every benchmark, its figures written into BENCHMARKS.md; about 30 minutes.
	$(PY) -m benchmarks.report --batch-args "$(ARGS)"

sim: $(VENV)/.installed ## The simulator on port 8765, 100x faster than real time.
	$(PY) -m nanophoto_simulator --port 8765 --time-scale 0.01

server: $(VENV)/.installed ## A local Prefect server with its UI on http://127.0.0.1:$(PREFECT_PORT) (leases on disk).
	$(PY) -m deployments.server --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(VENV)/.installed ## Prepare the configured Prefect server and deploy prefect.yaml (idempotent).
	$(PY) -m deployments.setup $(ARGS)

worker: $(VENV)/.installed ## A process worker for the sora2-process pool, WORKER_LIMIT runs at a time.
	$(PY) -c "from deployments.setup import require_api_url; require_api_url()"
	# The flow runs' `python` is this project's (the pool's command is `python -m prefect.engine`).
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PREFECT) worker start --pool sora2-process --type process \
		--limit $(WORKER_LIMIT)

cluster-up: $(VENV)/.installed ## Prefect's production topology here: PostgreSQL, Redis, 2 APIs, services.
	$(PY) -m deployments.cluster up $(ARGS)

cluster-down: ## Stop every process of the cluster and remove its data.
	$(PY) -m deployments.cluster down $(ARGS)

serve: $(VENV)/.installed ## No work pool: serve every flow from this one process.
	$(PY) -m deployments.serve

clean:
	rm -rf $(VENV) .prefect .cluster videos .pytest_cache .mypy_cache .ruff_cache
