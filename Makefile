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

.PHONY: help setup test test-fast lint format train describe eval sample export plot tokenizer data \
        cluster-up cluster-down dashboard submit resume logs status stop study bench gpu-check clean

help:  ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PRESET=$(PRESET) WORKERS=$(WORKERS) NODES=$(NODES) CLOUD=$(CLOUD) GPU=$(GPU) RUN=<id> STORAGE=s3://... CPU=1 ARGS=\"--key value ...\""

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch named in the same command keeps the CPU wheel: nothing may pull a CUDA build here.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (about a minute)

# The cluster targets need the cloud SDKs Ray's AWS/GCP node providers import (the `cloud` extra).
CLOUD_STAMP := $(VENV)/.installed-cloud
$(CLOUD_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev,cloud]'
	touch $(CLOUD_STAMP)

# Two pytest workers, a test file each (module fixtures stay shared): the suite alone keeps 2 cores
# about 70% busy (process start-up, Ray's health checks); two files side by side fill them. (Tried:
# the longest files first, in a conftest order: the Ray files then ran side by side and the suite
# took 1731 s against 1498 s in xdist's own order, by test count, on the same loaded machine.)
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

# The data targets read the hub (hf:// specs) unless HF_HUB_OFFLINE=1 is given for them.
DATA ?=
VOCAB ?=
TOKENIZER ?=
OUT ?=
SAMPLE ?= 1e9
DATA_HUB_OFFLINE ?= 0
need_data = $(if $(strip $(DATA)),,$(error DATA is missing: make $@ DATA=<spec> (configs/data/*.yaml, a path, glob or URL)))
need_vocab = $(if $(shell [[ "$(VOCAB)" =~ ^[1-9][0-9]*$$ ]] && echo ok),,$(error VOCAB must be a whole number (the vocabulary size, e.g. 50304), got '$(VOCAB)'))
need_tokenizer = $(if $(strip $(TOKENIZER)),,$(error TOKENIZER is missing: make data DATA=<spec> TOKENIZER=<folder of tokenizer.json> (make tokenizer makes one)))

tokenizer: $(STAMP)  ## byte-level BPE on a sample of a data set: DATA=<spec> VOCAB=<n> [OUT= SAMPLE=<bytes>] (default OUT: STORAGE/tokenizers/<name>-<vocab>)
	$(need_data)$(need_vocab)
	HF_HUB_OFFLINE=$(DATA_HUB_OFFLINE) HF_DATASETS_OFFLINE=$(DATA_HUB_OFFLINE) $(BIN)/python -m data_pipeline tokenizer train --data $(DATA) --vocab $(VOCAB) --sample-bytes $(SAMPLE) $(if $(strip $(OUT)),--out $(OUT)) $(ARGS)

data: $(STAMP)  ## pre-tokenize into megatron shards, resumable, with Ray Data (a Ray job if RAY_ADDRESS is http://...): DATA=<spec> TOKENIZER=<path> [OUT= WORKERS=]
	$(need_data)$(need_tokenizer)
	HF_HUB_OFFLINE=$(DATA_HUB_OFFLINE) HF_DATASETS_OFFLINE=$(DATA_HUB_OFFLINE) $(BIN)/python -m data_pipeline data --data $(DATA) --tokenizer $(TOKENIZER) $(if $(strip $(OUT)),--out $(OUT)) $(if $(filter command line,$(origin WORKERS)),--workers $(WORKERS)) $(ARGS)

describe: $(STAMP)  ## dry run: config, params, FLOPs, memory; a recipe's tokens, time and GPU-hours on p4d/p5/a2/a3: [PRESET= NODES= ARGS=]
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

cluster-up: $(CLOUD_STAMP)  ## start a GPU cluster: CLOUD=aws|gcp GPU=a100|h100 NODES=n STORAGE=s3://|gs://... IMAGE=<registry>/trmgpt:<tag> [aws: SUBNET=subnet-... SSH_CIDR=a.b.c.d/32 HEAD_SUBNET=subnet-...] [gcp: GCP_PROJECT=... GCP_SERVICE_ACCOUNT=...]
	$(need_cloud)$(need_nodes)
	$(BIN)/python -m cluster up --cloud $(CLOUD) --gpu $(GPU) --nodes $(NODES) $(if $(STORAGE),--storage $(STORAGE)) $(if $(IMAGE),--image $(IMAGE)) $(if $(SUBNET),--subnet $(SUBNET)) $(if $(HEAD_SUBNET),--head-subnet $(HEAD_SUBNET)) $(if $(SSH_CIDR),--ssh-cidr $(SSH_CIDR)) $(if $(GCP_PROJECT),--project $(GCP_PROJECT)) $(if $(GCP_SERVICE_ACCOUNT),--service-account $(GCP_SERVICE_ACCOUNT))

cluster-down: $(CLOUD_STAMP)  ## tear the cluster down: [CLOUD= GPU=]
	$(need_cloud)
	$(BIN)/python -m cluster down --cloud $(CLOUD) --gpu $(GPU)

dashboard: $(CLOUD_STAMP)  ## SSH tunnel to the head's dashboard and job API on localhost:8265
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
# TASK=addition|perm|cycle|pointer|group: the depth-task study instead of Shakespeare (its own section of
# bench/STUDY.md and bench/study_$(TASK).png); TASK_ARGS replaces the measured setting. group: the
# S_3 word problem where the recursion wins (10,000 steps; about 50 minutes on one core).
ifeq ($(TASK),group)
TASK_ARGS ?= --difficulty 1-10 --batch 64 --steps 10000 --eval-every 1000 --threads 1 \
	--set n_embd=64 --set n_loops=2 --set T_recursion=1 --set N_sup=2 --set N_sup_inference=2 \
	--infer-sup 4
endif
TASK_ARGS ?= --difficulty 1-3 --batch 64 --steps 500 --eval-every 100 --threads 1 \
	--set n_embd=64 --set n_loops=1 --set T_recursion=1 --set N_sup=2 --set N_sup_inference=2 \
	--infer-sup 4
study: $(STAMP)  ## does the recursion earn its compute? -> bench/STUDY.md, bench/study.png (about 15 min); TASK=addition: on a depth task
ifdef TASK
	$(BIN)/python bench/recursion_study.py --task $(TASK) $(TASK_ARGS) $(ARGS)
else
	$(BIN)/python bench/recursion_study.py --steps 180 --eval-every 60 --set device_batch_size=8 $(ARGS)
endif

# bench/report.py runs the scripts in this order (data_throughput takes the tiny trainer's tokens/s
# from overhead's run) and writes bench/REPORT.md, its PNGs and bench/results/ from this run alone.
bench: $(STAMP)  ## speed -> bench/REPORT.md: trainer overhead, cost model, inference, model step, data, GPU path (~15 min)
	$(BIN)/python bench/report.py bench/overhead.py bench/cost_model.py bench/inference.py \
		bench/model_step.py bench/data_throughput.py bench/gpu.py $(ARGS)

# A GPU machine's first check: exits 2 without CUDA, 1 if any configuration fails.
gpu-check: $(STAMP)  ## CUDA only: attention kernel, A and B in bf16 (ZeRO-1, ckpt, compile off/on), MFU, memory, NCCL -> bench/results/gpu.json (<= 8 min)
	$(BIN)/python bench/gpu.py --check $(ARGS)

clean:  ## remove runs/ and caches
	rm -rf runs .pytest_cache
