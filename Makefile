# Every user-facing action of trmgpt. Targets that need Python build .venv first if it is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/trmgpt/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONPATH := $(CURDIR)

PRESET ?= tiny
RUN ?=
RUN_DIR := runs/$(RUN)
NODES ?= 1
ARGS ?=
CLOUD ?= aws
GPU ?= a100

.PHONY: setup test test-fast lint format train describe eval sample export plot \
        cluster-up cluster-down submit resume logs status stop bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch named in the same command keeps the CPU wheel: nothing may pull a CUDA build here.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (about a minute)

test: $(STAMP)  ## the whole suite, slow multi-process tests included
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)  ## skip the slow multi-process tests while iterating
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

train: $(STAMP)  ## the embedded default: tiny preset, shipped corpus, CPU, local Ray
	$(BIN)/python -m launcher train --preset $(PRESET) --run-dir runs/$(PRESET)-local $(ARGS)

describe: $(STAMP)  ## dry run: resolved config, params, depths, FLOPs/token, memory per GPU
	$(BIN)/python -m launcher describe --preset $(PRESET) $(ARGS)

eval: $(STAMP)
	$(BIN)/python -m launcher eval --run-dir $(RUN_DIR) $(ARGS)

sample: $(STAMP)
	$(BIN)/python -m launcher sample --run-dir $(RUN_DIR) --prompt "$(or $(PROMPT),ROMEO:)" $(ARGS)

export: $(STAMP)
	$(BIN)/python -m launcher export --run-dir $(RUN_DIR) --out $(RUN_DIR)/export.safetensors $(ARGS)

plot: $(STAMP)  ## make plot RUN=<id>: loss, per-step losses, refinement -> runs/<id>/plots/*.png
	$(BIN)/python -m launcher plot --run-dir $(RUN_DIR)

cluster-up: $(STAMP)  ## make cluster-up CLOUD=aws|gcp GPU=a100|h100 NODES=n
	$(BIN)/python -m cluster up --cloud $(CLOUD) --gpu $(GPU) --nodes $(NODES)

cluster-down: $(STAMP)
	$(BIN)/python -m cluster down --cloud $(CLOUD) --gpu $(GPU)

submit: $(STAMP)  ## make submit PRESET=B NODES=4 ARGS="--n_loops=4"
	$(BIN)/python -m launcher submit --preset $(PRESET) --nodes $(NODES) $(ARGS)

resume: $(STAMP)
	$(BIN)/python -m launcher resume --run $(RUN) $(ARGS)

logs: $(STAMP)
	$(BIN)/python -m launcher logs --run $(RUN)

status: $(STAMP)
	$(BIN)/python -m launcher status

stop: $(STAMP)
	$(BIN)/python -m launcher stop --run $(RUN)

bench: $(STAMP)
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/data_throughput.py

clean:
	rm -rf runs .pytest_cache
