# biometry: the front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STUDY ?= demo
# tests and demo never use a GPU-specific code path unless one is there
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint demo figures benchmarks clean-runs lab

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,hpc]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	@touch $(STAMP)

install: $(STAMP) ## create .venv (when missing) and install biometry with its dev and hpc extras

test: $(STAMP) ## run the test suite (unit tests and notebook smoke tests on a tiny phantom)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the unit tests only, without the slow end-to-end ones
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff and the notebook-output check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/nbstripout --verify notebooks/*.ipynb

demo: $(STAMP) ## the main job on a phantom cohort: synthesise, prepare, train in CV, evaluate
	$(BIN)/biometry demo

figures: $(STAMP) ## regenerate every figure and table of a study from its run folders (STUDY=demo)
	$(BIN)/biometry figures --study $(STUDY)

LAB_PORT ?= 8888
# rooted at the checkout (so papermill_runs/ is browsable), opened on notebooks/
lab: $(STAMP) ## start JupyterLab on notebooks/ with the project's kernel (LAB_PORT=8888); prints the URL
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
		--ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --no-browser \
		--MappingKernelManager.default_kernel_name=python3 $(if $(filter 0,$(shell id -u)),--allow-root)

benchmarks: $(STAMP) ## run the benchmark scripts (figures go into BENCHMARKS.md by hand)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-runs: ## delete papermill_runs/ and figures/ outputs (keeps their READMEs)
	find papermill_runs figures -mindepth 1 ! -name README.md -delete
