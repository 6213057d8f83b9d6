#!/usr/bin/env bash
# The GPU recipe (about 8 minutes on an H100/H200): first the CUDA checks of training and evaluation
# (gpu_checks.py: --amp auto, a 2-epoch bf16 training with Ctrl-C and --resume, fp16 with the grad
# scaler, --compile, evaluate), then the benchmarks: the training loops (a)-(e) with FLOPs, MFU and a
# torch.profiler table of the last loop; the deep-supervised adaptive focal loss's share of a step
# against the host-OpenCV way; evaluate's seconds per real-size volume against medpy scoring.
# Everything printed is also kept in bench_gpu.md.
#     bash scripts/bench_gpu.sh [--peak-tflops N]      (extra options go to bench_train.py)
# Every part runs even when an earlier one fails (or runs past its time limit, in seconds:
# GPU_CHECKS_S, BENCH_TRAIN_S, BENCH_LOSSES_S, BENCH_EVALUATE_S); the failures are listed at the end and the
# exit status is 1 when there was one.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
exec > >(tee bench_gpu.md) 2>&1
failed=()

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, remember a failure
  local name=$1 seconds=$2 status
  shift 2
  echo "== $name"
  timeout --signal INT --kill-after 20 "$seconds" "$@"
  status=$?
  if [ "$status" -ne 0 ]; then
    failed+=("$name: exit status $status$([ "$status" -eq 124 ] && echo " (over ${seconds} s)")")
  fi
}

part "GPU" 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
part "CUDA checks" "${GPU_CHECKS_S:-240}" "$python" scripts/gpu_checks.py
part "training loops" "${BENCH_TRAIN_S:-300}" \
  "$python" scripts/bench_train.py --device cuda --configs R50-ViT-B_16 --profile 5 "$@"
part "losses" "${BENCH_LOSSES_S:-120}" "$python" scripts/bench_losses.py --device cuda
part "evaluate" "${BENCH_EVALUATE_S:-150}" "$python" scripts/bench_evaluate.py --device cuda

echo
if [ ${#failed[@]} -eq 0 ]; then
  echo "bench_gpu: every part ran"
else
  echo "bench_gpu: ${#failed[@]} part(s) failed:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
