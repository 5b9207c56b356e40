#!/usr/bin/env bash
# The README's main-job command. Until the fine-tuning workflow lands, the main job is the kernel benchmark on
# whatever device is present: CUDA build and GPU shapes when a GPU is visible, else the CPU build with small shapes.
#   bash scripts/demo.sh [extra bench.kernels args]
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  mode=cuda; size_args=()
  export SWIFTLORA_CUDA_ARCHS=${SWIFTLORA_CUDA_ARCHS:-}   # empty: the visible GPU's arch
else
  mode=cpu; size_args=(--quick)
fi
source scripts/_env.sh "$mode"
cd "$SWIFTLORA_ROOT"
exec "$PY" -m bench.kernels --ops rms_norm,rope,swiglu,geglu "${size_args[@]}" "$@"
