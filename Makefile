# Quick start: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-system bench lock clean up down

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpa demo

# Two pytest-xdist workers keep both cores busy while a test waits on its servers; a module runs whole
# on one worker, in collection order (tests/conftest.py: ModuleScheduling).
TEST_WORKERS ?= 2

test: $(STAMP) test-system
	$(PY) -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder

# What the suite needs beyond pip (Chromium, a running PostgreSQL); `make demo` needs none of it.
test-system:
	bash tests/setup_system.sh

# The local stack for UI-triggered runs (Prefect server + worker, MLflow server); see docs/deployments.md.
up: $(STAMP)
	$(VENV)/bin/dpa up

down: $(STAMP)
	$(VENV)/bin/dpa down

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --preset demo

# Re-pin after editing requirements.in (needs `uv`; seconds, no install).
lock:
	uv pip compile --python-version 3.11 requirements.in -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
