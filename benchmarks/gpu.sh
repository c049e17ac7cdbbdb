#!/usr/bin/env bash
# Issue 17's checks on one CUDA device in bf16 (benchmarks/gpu_bench.py: bounded-memory inits vs PEFT, host syncs
# of the training step, step times vs PEFT and the floor, torch.compile graph breaks and CoTo recompilations,
# end-to-end tokens/s vs PEFT + Trainer). At most 8 minutes. Without CUDA it says so and exits 0.
#   bash benchmarks/gpu.sh [--only init step ...] [--out results.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device (torch.cuda.is_available() is False): skipped, nothing was run."
    exit 0
fi
export TOKENIZERS_PARALLELISM=false
exec timeout --signal=TERM 480 "$PYTHON" benchmarks/gpu_bench.py --device cuda --dtype bfloat16 "$@"
