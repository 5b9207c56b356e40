#!/usr/bin/env bash
# Run from the repo root: bash bench/micro/logits_softmax/run.sh   (compiles ~20 s; runs ~30 s, most of it the host
# checks). Exit code 1 on any FAIL; LSM_SANITIZE=1 runs the small checks under compute-sanitizer (LSM_TOOL,
# default racecheck; exit 17 on a report). A hang (a barrier protocol bug) is cut by `timeout`.
set -euo pipefail
D=bench/micro/logits_softmax
NVCC=/usr/local/bin/nvcc; [ -x "$NVCC" ] || NVCC=nvcc
rm -f /tmp/lsm_bench
"$NVCC" -O3 -std=c++17 -arch=sm_90a -I csrc ${NVCC_FLAGS:-} -Xptxas -v -o /tmp/lsm_bench "$D/lsm_bench.cu" -lcublas 2>&1 \
  | grep -E "warning|error|spill|Used" || true
[ -x /tmp/lsm_bench ] || { echo "build failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv 2>/dev/null || true
if [ -n "${LSM_SANITIZE:-}" ]; then  # the softmax checks alone, small, without cuBLAS, under compute-sanitizer
  exec timeout ${LSM_TIMEOUT:-300} compute-sanitizer --tool "${LSM_TOOL:-racecheck}" --error-exitcode 17 \
    --print-limit 20 /tmp/lsm_bench
fi
timeout ${LSM_TIMEOUT:-300} /tmp/lsm_bench
if [ -n "${LSM_PIPELINE:-}" ]; then  # the pipeline alone (accumulators dropped), beside cuBLAS
  LSM_DISCARD=1 timeout 120 /tmp/lsm_bench
fi
