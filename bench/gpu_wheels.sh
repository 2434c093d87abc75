#!/usr/bin/env bash
# Wheels for a lent GPU machine that reaches no package index (BENCHMARKS.md, "Not measured yet"): the
# training stack's pins from requirements.lock that its image lacks or holds at other versions, for
# its Python 3.12 on x86-64, downloaded here into .whl/ (git- and docker-ignored) to travel with the
# working tree (the device tool's `carry`).
# Its image has torch 2.11 (CUDA 13), triton, accelerate, safetensors, tokenizers, pyarrow and pandas;
# torch stays its own. huggingface_hub travels: the stack imports httpx2, which its 2.x uses and the
# image's 1.x does not have. The whole carry must stay under 64 MiB.
#
#   bench/gpu_wheels.sh            # then, on the GPU machine, first thing in the command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
PACKAGES=(bitsandbytes transformers trl peft liger-kernel datasets dill multiprocess
          pydantic pydantic-core annotated-types typing-inspection
          huggingface-hub httpx2 httpcore2 truststore h11 anyio idna click)
LIMIT=$((64 * 1024 * 1024))

rm -rf "$DEST" && mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for name in "${PACKAGES[@]}"; do
  pin=$(grep -iE "^${name}==" requirements.lock) || { echo "gpu_wheels.sh: $name is not pinned in requirements.lock" >&2; exit 1; }
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$DEST" "${pin%% ;*}"  # without the lock's environment marker
done
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "$(ls "$DEST" | wc -l) wheels, $((wheels / 2**20)) MiB; with the working tree $(((wheels + tree) / 2**20)) of 64 MiB"
if [ $((wheels + tree)) -gt "$LIMIT" ]; then
  echo "gpu_wheels.sh: over the 64 MiB a call can carry" >&2
  exit 1
fi
