# Everything sets itself up: the first target that needs the virtualenv makes it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test unit lint bench sim clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed ## The main job: topic to MP4 on the simulator and Prefect's embedded server.
	$(PY) -m sora2.demo

test: lint $(VENV)/.installed ## Lint, type-check, then the whole test suite.
	$(PY) -m pytest

unit: $(VENV)/.installed ## The tests that need no Prefect server (seconds).
	$(PY) -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

sim: $(VENV)/.installed ## The simulator on port 8765, 100x faster than real time.
	$(PY) -m nanophoto.simulator --port 8765 --time-scale 0.01

clean:
	rm -rf $(VENV) .prefect videos .pytest_cache .mypy_cache .ruff_cache
