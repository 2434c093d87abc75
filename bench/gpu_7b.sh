#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md ("7B QLoRA on one GPU"), in one go, about 12 minutes on
# one H100/H200 with every variant: a Llama-7B-shaped model with random weights (no download),
# instruction rows of 64-2048 tokens, the memory estimate, then the tutorial recipe against the
# recipe and its variants, each in a fresh process. A few-MB model runs the same chain first, so
# that a broken environment fails in a minute, not after the 7B model is built. The report
# (gpu_7b_train.json) is rewritten after every run, so a run stopped by a time limit keeps what
# it measured; a 7B model built before (outputs/bench/llama-7b, written whole or not at all) is
# reused.
#
#   bench/gpu_7b.sh                      # results in bench/results/
#   RESULTS=/tmp/r STEPS=10 bench/gpu_7b.sh
#   PROFILE=3 VARIANTS=tutorial,recipe bench/gpu_7b.sh   # + 3 steps of each under torch.profiler:
#                                        # bench/results/gpu_7b_train-profile/<variant>/ops.txt
#   SMOKE=0 bench/gpu_7b.sh              # without the few-MB chain (the machine ran it already)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
STEPS=${STEPS:-8}
PROFILE=${PROFILE:-0}  # steps to record per variant after the timed runs (0: none)
SMOKE=${SMOKE:-1}
VARIANTS=${VARIANTS:-tutorial,recipe,recipe+before-gpu-defaults,recipe+random-batches,recipe+checkpointing,recipe-liger,recipe+packing,recipe+packing+block-mask}
WORK=outputs/bench  # where bench/recipes/gpu-7b-varlen.yaml looks
mkdir -p "$RESULTS" "$WORK"

$PY - <<'EOF'
import torch, transformers, peft, trl, bitsandbytes, accelerate
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}, accelerate {accelerate.__version__}")
EOF

$PY bench/synthetic.py data --out "$WORK/varlen.jsonl" --rows 2000
if [ "$SMOKE" != 0 ]; then
  echo "== smoke: the same chain on a few-MB model"
  $PY bench/synthetic.py model --shape llama-smoke --out "$WORK/llama-smoke"
  sed "s#$WORK/llama-7b#$WORK/llama-smoke#" bench/recipes/gpu-7b-varlen.yaml >"$WORK/smoke.yaml"
  $PY bench/train_throughput.py --recipe "$WORK/smoke.yaml" --steps 2 --repeats 1 \
      --variants tutorial,recipe,recipe+packing --json "$RESULTS/gpu_smoke.json" --profile $((PROFILE > 0))
fi

echo "== 7B"
if [ -f "$WORK/llama-7b/config.json" ]; then
  echo "reusing $WORK/llama-7b"
else
  $PY bench/synthetic.py model --shape llama-7b --out "$WORK/llama-7b"
fi
for packing in false true; do
  $PY -m training estimate -r bench/recipes/gpu-7b-varlen.yaml --card h100-80gb \
      --set data.packing=$packing --json >"$RESULTS/gpu_7b_estimate_packing_$packing.json"
done
$PY bench/train_throughput.py --recipe bench/recipes/gpu-7b-varlen.yaml --steps "$STEPS" --repeats 1 \
    --variants "$VARIANTS" --json "$RESULTS/gpu_7b_train.json" --profile "$PROFILE"
