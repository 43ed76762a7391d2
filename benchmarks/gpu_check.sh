#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes on one GPU: the `gpu` pytest tier, the training step at the
# published shapes (benchmarks/train_step.py --device cuda), and the 256T-L memory fit (batch 128, 80 GB),
# printed as one table and saved to benchmarks/results/gpu_check.json (+ train_step_cuda.json).
# Exits 2 where there is no CUDA device, 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# No DS_ACCELERATOR=cpu here: DeepSpeed must pick CUDA.
unset DS_ACCELERATOR
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
