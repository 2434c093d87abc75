# qlora-stack: the user's verbs. `make help` lists them.
#
# RUNTIME=local runs in a virtual environment here (created on first use); RUNTIME=docker
# runs the same commands in the containers of compose.yaml. Default: docker when a Docker
# engine with NVIDIA GPUs is reachable, local otherwise.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/quickstart.yaml
# Extra recipe overrides, e.g. SET="training.max_steps=20 lora.r=8"
SET ?=
FORCE ?=
WHAT ?= merged
REPO ?=
RUNTIME ?= $(shell if docker info >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo docker; else echo local; fi)
PYTEST_ARGS ?=
# Processes (GPUs) per machine for `make train`: GPUS=4 starts 4 through `accelerate launch`
# (with the recipe's distributed.strategy, ddp when it says none). Multi-node settings go in
# LAUNCH, e.g. LAUNCH="--num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1".
GPUS ?= 1
LAUNCH ?=
CARD ?=

SET_ARGS := $(foreach s,$(SET),--set $(s))
FORCE_ARG := $(if $(FORCE),--force)
STAMP := $(VENV)/.installed

.PHONY: help venv train estimate merge eval push validate tiny-model test lint clean

help: ## list the verbs
	@echo "qlora-stack (RUNTIME=$(RUNTIME), RECIPE=$(RECIPE))"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,dev]'
	@touch $@

venv: $(STAMP) ## create the virtual environment (.venv) with the pinned stack

train: $(STAMP) ## fine-tune RECIPE with QLoRA (resumes an interrupted run; FORCE=1 starts over)
	$(PY) -m training train --recipe $(RECIPE) $(SET_ARGS) $(FORCE_ARG) --gpus $(GPUS) $(LAUNCH)

merge: $(STAMP) ## fold RECIPE's adapter into full weights: outputs/<run>/merged (FORCE=1 replaces it)
	$(PY) -m training merge --recipe $(RECIPE) $(SET_ARGS) $(FORCE_ARG)

eval: $(STAMP) ## perplexity and answers of base, adapter and merged model side by side (eval.json, eval.png)
	$(PY) -m training eval --recipe $(RECIPE) $(SET_ARGS)

push: $(STAMP) ## publish the merged model (WHAT=adapter for the adapter) to the Hub, private; REPO=user/name
	$(PY) -m training push --recipe $(RECIPE) --what $(WHAT) $(if $(REPO),--repo-id $(REPO)) $(SET_ARGS)

estimate: $(STAMP) ## predict peak GPU memory per device for RECIPE on GPUS GPUs (CARD=h100-80gb)
	$(PY) -m training estimate --recipe $(RECIPE) $(SET_ARGS) --gpus $(GPUS) $(if $(CARD),--card $(CARD))

validate: $(STAMP) ## check RECIPE without loading a model
	$(PY) -m training validate --recipe $(RECIPE) $(SET_ARGS)

tiny-model: $(STAMP) ## build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)
	$(PY) -m training tiny-model

test: $(STAMP) ## run the test suite on the CPU (real 4-bit models, real servers)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff on the Python code
	$(VENV)/bin/ruff check training serving tests bench

clean: ## remove outputs/ and caches (asks first)
	@read -r -p "Delete outputs/ (adapters, merged models, checkpoints) and caches? [y/N] " answer; \
	if [[ "$$answer" == [yY] ]]; then rm -rf outputs .pytest_cache .ruff_cache; \
	find . -name __pycache__ -prune -exec rm -rf {} +; echo removed; else echo kept; fi
