#!/usr/bin/env bash
# Compile and run the standalone NF4 dequantization benchmark. From the repo root: bash bench/micro/nf4_dequant_floor/run.sh [filter]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" -O3 -std=c++17 -arch=sm_90a -I ../../../csrc -o /tmp/dq_bench dq_bench.cu
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader || true
/tmp/dq_bench "$@"
