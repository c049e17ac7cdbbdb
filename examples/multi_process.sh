#!/usr/bin/env bash
# The same recipe on several processes. Each process reads training.batch_size examples per micro-batch, so
# the global batch is batch_size x grad_accum x processes; only the main process writes files.
set -euo pipefail
RECIPE=${1:-recipes/quickstart.yaml}

# GPUs (or CPUs with the gloo backend when there is no GPU), with torchrun:
torchrun --nproc-per-node 2 -m peftkit train "$RECIPE" training.output_dir=runs/torchrun

# The same with Accelerate (run `accelerate config` once for DeepSpeed / FSDP / mixed precision). On a machine
# without GPUs, --multi_gpu still starts the processes (they use gloo); --cpu alone would start only one.
accelerate launch --multi_gpu --num_processes 2 -m peftkit train "$RECIPE" training.output_dir=runs/accelerate
