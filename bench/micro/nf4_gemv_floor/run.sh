#!/usr/bin/env bash
# Run from the repo root: bash bench/micro/nf4_gemv_floor/run.sh   (compiles ~10 s, runs ~5 s)
set -euo pipefail
D=bench/micro/nf4_gemv_floor
NVCC=/usr/local/bin/nvcc; [ -x "$NVCC" ] || NVCC=nvcc
"$NVCC" -O3 -std=c++17 -arch=sm_90a -I csrc -o /tmp/gemv_bench "$D/gemv_bench.cu"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv 2>/dev/null || true
/tmp/gemv_bench
# the small one-pass-CTA GEMV variants (gemv_small.cu), with the same reference rows
"$NVCC" -O3 -std=c++17 -arch=sm_90a -I csrc -o /tmp/gemv_small "$D/gemv_small.cu"
/tmp/gemv_small
