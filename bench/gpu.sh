#!/usr/bin/env bash
# The GPU benchmark on a CUDA machine with only Python, torch (+ torchvision), numpy and numba:
# no Ray, no ffcv, no network. Never part of CI. About 3-5 minutes on one H100/H200.
#     bash bench/gpu.sh [extra bench/gpu.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
PYTHONUNBUFFERED=1 timeout 480 "$PY" bench/gpu.py "$@"
