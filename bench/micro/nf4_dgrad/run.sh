#!/usr/bin/env bash
# Run from the repo root: bash bench/micro/nf4_dgrad/run.sh   (compiles ~15 s; runs ~20 s, most of it host reference
# and input generation). Exit code 1 on any FAIL. A watchdog inside the kernel traps after ~2 s stuck on one mbarrier
# and the program then prints which one ("dgrad WATCHDOG fired ..."); `timeout` is the outer guard.
# Sanitizer run (small shape only, no watchdog):
#   NVCC_FLAGS=-DDGRAD_WATCHDOG=0 bash bench/micro/nf4_dgrad/run.sh   # builds /tmp/dgrad_bench, then:
#   DGRAD_SMALL_ONLY=1 compute-sanitizer --tool racecheck /tmp/dgrad_bench   (also memcheck, synccheck)
set -euo pipefail
D=bench/micro/nf4_dgrad
NVCC=/usr/local/bin/nvcc; [ -x "$NVCC" ] || NVCC=nvcc
rm -f /tmp/dgrad_bench
"$NVCC" -O3 -std=c++17 -arch=sm_90a -I csrc ${NVCC_FLAGS:-} -Xptxas -v -o /tmp/dgrad_bench "$D/dgrad_bench.cu" 2>&1 \
  | grep -E "warning|error|dgrad_kernel|spill|Used|C75" || true
[ -x /tmp/dgrad_bench ] || { echo "build failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv 2>/dev/null || true
timeout 600 /tmp/dgrad_bench
