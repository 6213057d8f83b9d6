#!/usr/bin/env bash
# The GPU benchmark recipe (about 5 minutes on an H100/H200): the training loops (a)-(d) with FLOPs,
# MFU and a torch.profiler table of the fastest loop; the deep-supervised adaptive focal loss's
# share of a step against the host-OpenCV way; evaluate's seconds per real-size volume against
# medpy scoring. Everything printed is also kept in bench_gpu.md.
#     bash scripts/bench_gpu.sh [--peak-tflops N]      (extra options go to bench_train.py)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$python" scripts/bench_train.py --device cuda --configs R50-ViT-B_16 --profile 5 "$@"
  "$python" scripts/bench_losses.py --device cuda
  "$python" scripts/bench_evaluate.py --device cuda
} 2>&1 | tee bench_gpu.md
