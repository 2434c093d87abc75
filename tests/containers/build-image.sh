#!/usr/bin/env bash
# Build a project image on the dev/CI machine: Podman (runc), the local Debian base made by
# podman-env.sh, this machine's CA bundle and its local wheel folder (CPU torch) mounted into
# the build. Users build the same docker/Dockerfile with plain `docker build`; everything
# machine-specific stays in this script.
#
#   tests/containers/build-image.sh [extra podman build args, e.g. --no-cache]
#
# Environment: IMAGE (tag, default qlora-stack:latest, the name compose.yaml uses),
#   DOCKERFILE (default docker/Dockerfile; docker/Dockerfile.vllm-cpu for vLLM's CPU image),
#   LOCAL_BASE_IMAGE, CONTEXT (build context, default the repository root),
#   CA_BUNDLE and WHEEL_DIRS (default: what this machine's pip config says), EXTRAS (the project
#   image's optional groups, default serve,notebook,export: the Dockerfile's without speed).
set -euo pipefail

say() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-qlora-stack:latest}
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/debian:bookworm}
CONTEXT=${CONTEXT:-$repo}
DOCKERFILE=${DOCKERFILE:-docker/Dockerfile}

command -v podman >/dev/null || die "podman is missing: run tests/containers/podman-env.sh first"
podman image exists "$LOCAL_BASE_IMAGE" \
  || die "base image $LOCAL_BASE_IMAGE is missing: run tests/containers/podman-env.sh first"
[ -f "$CONTEXT/$DOCKERFILE" ] || die "no $DOCKERFILE under build context $CONTEXT"

# First value of a pip setting, environment (:env:) before config files, as pip itself ranks them.
pip_setting() {
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | head -n 1
}

# pip inside the build must trust the same CA as this machine (its traffic is intercepted).
# The bundle goes to /run/ca.crt, not over the image's own bundle, which apt's
# ca-certificates package rewrites.
CA_BUNDLE=${CA_BUNDLE:-$(pip_setting cert)}
CA_BUNDLE=${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

# The CPU torch wheel lies in pip's find-links folder(s). Without them pip would download the
# multi-GB CUDA build of torch, so their absence is an error here.
WHEEL_DIRS=${WHEEL_DIRS:-$(pip_setting find-links)}
[ -n "$WHEEL_DIRS" ] || die "pip has no find-links setting (see 'pip config list'); set WHEEL_DIRS to the folder with the CPU torch wheel"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mounts=()
links=()
{
  echo "[global]"
  if [ -f "$CA_BUNDLE" ]; then
    echo "cert = /run/ca.crt"
    mounts+=(-v "$CA_BUNDLE:/run/ca.crt:ro")
  else
    say "no CA bundle at '$CA_BUNDLE': pip in the build uses its own certificates"
  fi
  i=0
  for dir in $WHEEL_DIRS; do
    dir=${dir#file://}
    [ -d "$dir" ] || die "find-links folder '$dir' does not exist"
    compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null && cpu_torch=$dir
    mounts+=(-v "$dir:/run/wheels/$i:ro")
    links+=("/run/wheels/$i")
    i=$((i + 1))
  done
  echo "find-links = ${links[*]}"
} >"$work/pip.conf"
mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
[ -n "${cpu_torch:-}" ] || say "warning: no CPU torch wheel in $WHEEL_DIRS: pip may download the multi-GB CUDA build"

say "building $IMAGE from $CONTEXT/$DOCKERFILE on $LOCAL_BASE_IMAGE"
say "pip in the build: CA $CA_BUNDLE, find-links $WHEEL_DIRS"
start=$(date +%s)
# --format docker: with the default OCI format, buildah 1.28 silently ignores the Dockerfile's
# SHELL line and runs RUN under /bin/sh (no bash, no pipefail).
# --pull=never: no registry is reachable; fail at once instead of waiting on one.
# The project image without its speed extra: Liger's kernels need a GPU, and on CPU torch the extra
# would only add Triton (a 170 MB download) that nothing here can run.
extras=()
[ "$DOCKERFILE" = docker/Dockerfile ] && extras=(--build-arg "EXTRAS=${EXTRAS:-serve,notebook,export}")
podman --runtime runc build \
  --format docker \
  --pull=never \
  --file "$CONTEXT/$DOCKERFILE" \
  --build-arg "BASE_IMAGE=$LOCAL_BASE_IMAGE" \
  "${extras[@]}" \
  --tag "$IMAGE" \
  "${mounts[@]}" \
  "$@" \
  "$CONTEXT" \
  || die "podman build failed"
elapsed=$(($(date +%s) - start))

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in ${elapsed}s, size $(numfmt --to=si --suffix=B "$size")"
