# Every user-facing action of trmgpt; `make help` lists them. Each target prints the command it
# runs. Targets that need Python build .venv first if it is missing. The Python side picks the
# accelerator itself (CUDA when torch sees a GPU, else DeepSpeed's CPU accelerator).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONPATH := $(CURDIR)

PRESET ?= tiny
RUN ?=
RUN_DIR = runs/$(RUN)
NODES ?= 1
WORKERS ?= 2
ARGS ?=
CLOUD ?= aws
GPU ?= a100
PROMPT ?= ROMEO:
CPU ?=
# Where cluster runs live ($STORAGE/<run id>/): required by submit; plot/eval/sample/logs read a
# run that is not in runs/ from there
STORAGE ?=
ifneq ($(strip $(STORAGE)),)
export TRMGPT_STORAGE := $(STORAGE)
endif

# Checks that run before a target's command: a clear message and a non-zero exit, nothing started.
need_run = $(if $(strip $(RUN)),,$(error RUN is missing: make $@ RUN=<run id> (the folder name under runs/, or the id `make submit` printed)))
need_nodes = $(if $(shell [[ "$(NODES)" =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error NODES must be a whole number >= 1, got '$(NODES)'))
need_workers = $(if $(shell [[ "$(WORKERS)" =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error WORKERS must be a whole number >= 1, got '$(WORKERS)'))
need_preset = $(if $(wildcard configs/presets/$(PRESET).yaml),,$(error unknown PRESET '$(PRESET)'; choose one of: $(basename $(notdir $(wildcard configs/presets/*.yaml)))))
need_cloud = $(if $(filter $(CLOUD),aws gcp),,$(error CLOUD must be aws or gcp, got '$(CLOUD)'))$(if $(filter $(GPU),a100 h100),,$(error GPU must be a100 or h100, got '$(GPU)'))

.PHONY: help setup test test-fast lint format train describe eval sample export plot \
        cluster-up cluster-down dashboard submit resume logs status stop study bench clean

help:  ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PRESET=$(PRESET) WORKERS=$(WORKERS) NODES=$(NODES) CLOUD=$(CLOUD) GPU=$(GPU) RUN=<id> STORAGE=s3://... CPU=1 ARGS=\"--key value ...\""

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch named in the same command keeps the CPU wheel: nothing may pull a CUDA build here.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (about a minute)

# Two pytest workers, a test file each (module fixtures stay shared): the suite alone keeps 2 cores
# about 70% busy (process start-up, Ray's health checks); two files side by side fill them.
XDIST := -n 2 --dist loadfile

test: $(STAMP)  ## the whole suite, slow multi-process and Ray tests included
	$(BIN)/python -m pytest -q $(XDIST) --durations=15 tests

test-fast: $(STAMP)  ## skip the slow multi-process tests while iterating
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

format: $(STAMP)  ## ruff format + fixes
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

train: $(STAMP)  ## train on this machine through a local Ray (tiny by default): [PRESET= WORKERS= RUN= ARGS=]
	$(need_preset)$(need_workers)
	$(BIN)/python -m launcher train --ray --preset $(PRESET) --workers $(WORKERS) $(if $(strip $(RUN)),--run-dir $(RUN_DIR)) $(ARGS)

describe: $(STAMP)  ## dry run: config, params, depths, FLOPs/token, memory per GPU: [PRESET= NODES= ARGS=]
	$(need_preset)$(need_nodes)
	$(BIN)/python -m launcher describe --preset $(PRESET) --nodes $(NODES) $(ARGS)

eval: $(STAMP)  ## val loss, bits per byte, loss per supervision step: RUN=<id> [STORAGE= for a cluster run]
	$(need_run)
	$(BIN)/python -m launcher eval --run-dir $(RUN_DIR) $(ARGS)

sample: $(STAMP)  ## generate text: RUN=<id> [PROMPT=...]
	$(need_run)
	$(BIN)/python -m launcher sample --run-dir $(RUN_DIR) --prompt "$(PROMPT)" $(ARGS)

export: $(STAMP)  ## EMA weights to runs/<id>/export.safetensors: RUN=<id>
	$(need_run)
	$(BIN)/python -m launcher export --run-dir $(RUN_DIR) --out $(RUN_DIR)/export.safetensors $(ARGS)

plot: $(STAMP)  ## loss, per-step losses, refinement -> runs/<id>/plots/*.png: RUN=<id> [STORAGE=]
	$(need_run)
	$(BIN)/python -m launcher plot --run-dir $(RUN_DIR)

cluster-up: $(STAMP)  ## start a GPU cluster: CLOUD=aws|gcp GPU=a100|h100 NODES=n [STORAGE=s3://... SECURITY_GROUP=sg-... GCP_PROJECT=...]
	$(need_cloud)$(need_nodes)
	$(BIN)/python -m cluster up --cloud $(CLOUD) --gpu $(GPU) --nodes $(NODES) $(if $(STORAGE),--storage $(STORAGE)) $(if $(SECURITY_GROUP),--security-group $(SECURITY_GROUP)) $(if $(GCP_PROJECT),--project $(GCP_PROJECT))

cluster-down: $(STAMP)  ## tear the cluster down: [CLOUD= GPU=]
	$(need_cloud)
	$(BIN)/python -m cluster down --cloud $(CLOUD) --gpu $(GPU)

dashboard: $(STAMP)  ## SSH tunnel to the head's dashboard and job API on localhost:8265
	$(need_cloud)
	$(BIN)/python -m cluster dashboard --cloud $(CLOUD) --gpu $(GPU)

submit: $(STAMP)  ## submit a Ray job: STORAGE=s3://... PRESET=B NODES=4 [CPU=1] ARGS="--n_loops=4" (prints the run id)
	$(need_preset)$(need_nodes)
	$(BIN)/python -m launcher submit --preset $(PRESET) --nodes $(NODES)$(if $(strip $(CPU)), --cpu) $(ARGS)

resume: $(STAMP)  ## resubmit a run with --resume latest: RUN=<id> [ARGS="--max-steps N"]
	$(need_run)
	$(BIN)/python -m launcher resume --run $(RUN) $(ARGS)

logs: $(STAMP)  ## a run's job logs: RUN=<id> [ARGS=--follow]
	$(need_run)
	$(BIN)/python -m launcher logs --run $(RUN) $(ARGS)

status: $(STAMP)  ## every run on the cluster: state, step, loss, tokens/s (from each run's bucket)
	$(BIN)/python -m launcher status

stop: $(STAMP)  ## checkpoint, then stop a run's job: RUN=<id> [ARGS="--wait S"]
	$(need_run)
	$(BIN)/python -m launcher stop --run $(RUN) $(ARGS)

# One process with make train's global batch (2 workers x 4 sequences of 256 tokens).
study: $(STAMP)  ## does the recursion earn its compute? -> bench/STUDY.md, bench/study.png (about 15 min)
	$(BIN)/python bench/recursion_study.py --steps 180 --eval-every 60 --set device_batch_size=8 $(ARGS)

# bench/report.py runs the scripts in this order (data_throughput takes the tiny trainer's tokens/s
# from overhead's run) and writes bench/REPORT.md, its PNGs and bench/results/ from this run alone.
bench: $(STAMP)  ## speed -> bench/REPORT.md: trainer overhead, cost model, inference, model step, data, GPU path (~15 min)
	$(BIN)/python bench/report.py bench/overhead.py bench/cost_model.py bench/inference.py \
		bench/model_step.py bench/data_throughput.py bench/gpu.py $(ARGS)

clean:  ## remove runs/ and caches
	rm -rf runs .pytest_cache
