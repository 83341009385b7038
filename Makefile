# Every target installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
export RAY_USAGE_STATS_ENABLED = 0
export MLFLOW_DISABLE_TELEMETRY = true
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test test-unit lint format bench ui clean

install: $(STAMP)

# The base install runs the demo and the UI; the other targets add the test extras (pytest,
# sklearn, moto, s3fs, wordllama, transformers, ruff) on top of it.
$(BASE): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(BASE)
	$(BIN)/lesa synth $(DEMO)/data --seed 0 --train 3000 --val 300 --test 600
	rm -rf $(DEMO)/run
	$(BIN)/lesa train launch/synthetic.yaml --out $(DEMO)/run --set data.url=$(DEMO)/data --set eval.every=50

# Everything (CI); `make test-unit` is the fast lane: tests/ without tests/integration (no Ray
# cluster, no CLI subprocess) and without the few integration-marked tests left beside unit ones.
# TEST_WORKERS=3 runs the files on three pytest processes (pytest-xdist, a file per process, the
# longest first: tests/conftest.py). Serial is the default: on two cores the parallel suite took
# as long (25 min) and a two-node Ray cluster of test_submit.py then timed out starting.
TEST_WORKERS ?= 0
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/integration -m "not integration"

# Lint and format check (ruff, configured in pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# CPU benchmarks, each against a baseline measured in the same run (docs/performance.md).
bench: $(STAMP)
	mkdir -p bench_results
	$(BIN)/python benchmarks/loader.py --json bench_results/loader.json
	$(BIN)/python benchmarks/training.py --json bench_results/training.json
	$(BIN)/python benchmarks/zero_checkpoint.py --json bench_results/zero_checkpoint.json
	$(BIN)/python benchmarks/feature_cache.py --json bench_results/feature_cache.json
	$(BIN)/python benchmarks/eval_metrics.py --images 40000 --labels 400 7586 --json bench_results/eval_metrics.json
	$(BIN)/python benchmarks/metrics_cli.py --images 20000 --labels 7586 --json bench_results/metrics_cli.json
	$(BIN)/python benchmarks/summary.py bench_results

# One web worker and no job runner (MLflow's GenAI jobs, five more processes): two processes, a
# few seconds. MLflow 3.17 opens on its GenAI view; ?workflowType=machine_learning shows runs.
ui: $(BASE)
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf $(DEMO) mlflow.db mlartifacts .pytest_cache bench_results
