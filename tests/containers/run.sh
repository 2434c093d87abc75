#!/usr/bin/env bash
# make test-containers: build the images from docker/Dockerfile, docker/Dockerfile.vllm-cpu and
# docker/llamacpp.Dockerfile, then run the project's compose.yaml (+ compose.cpu.yaml) in real
# containers with pytest (tests/containers/).
#
#   tests/containers/run.sh [pytest args]
#
# Engine: a Docker engine when one answers (the real CUDA image, built with `docker build`),
# otherwise Podman behind a Docker-API socket, set up by podman-env.sh (root, Debian; what CI
# uses), with the image built on a local Debian base and the CPU torch wheel. QLORA_ENGINE=podman
# or docker forces one.
#
# Environment: PYTHON (with pytest; default .venv/bin/python), QLORA_IMAGE, VLLM_CPU_IMAGE and
# LLAMACPP_IMAGE (tags to build and test, default qlora-stack:latest, qlora-stack-vllm-cpu:latest and
# qlora-stack-llamacpp:latest). Every container, network and volume of the test project is
# removed at the end, pass or fail.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
PYTHON=${PYTHON:-$repo/.venv/bin/python}
export QLORA_IMAGE=${QLORA_IMAGE:-qlora-stack:latest}
export VLLM_CPU_IMAGE=${VLLM_CPU_IMAGE:-qlora-stack-vllm-cpu:latest}
export LLAMACPP_IMAGE=${LLAMACPP_IMAGE:-qlora-stack-llamacpp:latest}
export QLORA_TEST_PROJECT=${QLORA_TEST_PROJECT:-qlora-test-$(date +%s)-$$}
export QLORA_CONTAINER_TESTS=1

say() { printf '\n[test-containers] %s\n' "$*" >&2; }
die() { printf '[test-containers] ERROR: %s\n' "$*" >&2; exit 1; }
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0)) s"; }

engine=${QLORA_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    engine=docker
  else
    engine=podman
  fi
fi
export QLORA_ENGINE=$engine

if [ "$engine" = podman ]; then
  say "setting up Podman, Docker Compose v2 and the local base image (tests/containers/podman-env.sh)"
  # shellcheck source=tests/containers/podman-env.sh
  source "$repo/tests/containers/podman-env.sh" || die "podman-env.sh failed"
  export QLORA_COMPOSE=docker-compose
  compose=(docker-compose)
  say "building $QLORA_IMAGE (tests/containers/build-image.sh) [$(elapsed)]"
  IMAGE=$QLORA_IMAGE "$repo/tests/containers/build-image.sh" || die "image build failed"
  say "building $VLLM_CPU_IMAGE (tests/containers/build-image.sh) [$(elapsed)]"
  IMAGE=$VLLM_CPU_IMAGE DOCKERFILE=docker/Dockerfile.vllm-cpu "$repo/tests/containers/build-image.sh" \
    || die "vLLM CPU image build failed"
  say "building $LLAMACPP_IMAGE (tests/containers/build-image.sh) [$(elapsed)]"
  IMAGE=$LLAMACPP_IMAGE DOCKERFILE=docker/llamacpp.Dockerfile "$repo/tests/containers/build-image.sh" \
    || die "llama.cpp image build failed"
else
  export QLORA_COMPOSE="docker compose"
  compose=(docker compose)
  say "building $QLORA_IMAGE with docker build [$(elapsed)]"
  docker build -f docker/Dockerfile -t "$QLORA_IMAGE" . || die "image build failed"
  say "building $VLLM_CPU_IMAGE with docker build [$(elapsed)]"
  docker build -f docker/Dockerfile.vllm-cpu -t "$VLLM_CPU_IMAGE" . || die "vLLM CPU image build failed"
  say "building $LLAMACPP_IMAGE with docker build [$(elapsed)]"
  docker build -f docker/llamacpp.Dockerfile -t "$LLAMACPP_IMAGE" . || die "llama.cpp image build failed"
fi
say "image built [$(elapsed)]; compose: $("${compose[@]}" version --short), project $QLORA_TEST_PROJECT"

cleanup() {
  local status=$?
  # pytest tears its project down itself; this catches a pytest that crashed or was killed.
  say "removing every container, network and volume of project $QLORA_TEST_PROJECT"
  "${compose[@]}" -p "$QLORA_TEST_PROJECT" -f compose.yaml -f compose.cpu.yaml --profile cpu --profile gpu \
    down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  say "finished with status $status [$(elapsed)]"
}
trap cleanup EXIT
# Killed by CI (a timeout) or Ctrl-C: exit through the cleanup above.
trap 'exit 143' TERM
trap 'exit 130' INT

say "running tests/containers with pytest [$(elapsed)]"
"$PYTHON" -m pytest tests/containers -p no:cacheprovider -ra --durations=15 "$@"
