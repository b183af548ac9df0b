#!/usr/bin/env bash
# The GPU figures in one call of at most 5 minutes (issue 20): images per hour of predict-fold,
# assemble-instances and label-vertebrae on CUDA and on this machine's CPU, CUDA-vs-CPU mask and level
# agreement, and SPINEPS 2.1.3's predictor on the same models when SPINEPS_PYTHON names the python of a
# SPINEPS environment.
# Needs this repository installed (pip install -e .) with a CUDA build of torch. Usage:
#   [SPINEPS_PYTHON=/path/to/spineps-env/bin/python] bash benchmarks/gpu.sh [images, default 6] [log file]
# Last line of the log: the JSON of benchmarks/bench_gpu.py; copy its figures into benchmarks/README.md (GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-6}
log=${2:-gpu-benchmark.log}
{
  python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: benchmarks/gpu.sh measures the GPU path"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
  PYTHONUNBUFFERED=1 timeout 290 python benchmarks/bench_gpu.py --device cuda --images "$images" ${SPINEPS_PYTHON:+--spineps "$SPINEPS_PYTHON"}
} 2>&1 | tee "$log"
