#!/usr/bin/env bash
# The GPU machine's check, in one go: build for the GPU's arch, run the whole test suite (gpu tests included),
# run compute-sanitizer (memcheck, racecheck, synccheck) over every kernel (scripts/sanitize_ops.py), check that
# a CPU-only build rejects CUDA tensors clearly, and run the kernel benchmark (with peers when PEERS names a
# folder holding them).
#   bash scripts/gpu_check.sh [OUT_DIR]      env: PYTHON (default python3), SWIFTLORA_CUDA_ARCHS (default 90a),
#                                            PEERS (site folder with liger_kernel / unsloth),
#                                            STEPS (default "build tests sanitizer bench cpu-only"),
#                                            BENCH_OPS (default: every op in bench/ops)
# Every step runs even if an earlier one failed; OUT_DIR/summary.txt lists each step's status and time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-build/gpu_check}" && cd "${1:-build/gpu_check}" && pwd)
PY=${PYTHON:-python3}
export SWIFTLORA_CUDA_ARCHS=${SWIFTLORA_CUDA_ARCHS:-90a} PYTHONUNBUFFERED=1 JOBS=${JOBS:-$(nproc)}
summary="$out/summary.txt"; : >"$summary"
overall=0
STEPS=" ${STEPS:-build tests sanitizer bench cpu-only} "
want() { [[ $STEPS == *" $1 "* ]]; }

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s) rc
  echo; echo "================ $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || overall=1
  printf '%-28s rc=%-4s %5ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$summary"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2; } 2>&1 | tee "$out/versions.txt"

want build && step build 600 env PYTHON="$PY" bash scripts/dev_build.sh
# pytest-xdist, where installed, runs the suite in 4 processes (a crashing test then fails alone).
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4" || true)
want tests && step tests 900 env PYTHONPATH=python:. "$PY" -m pytest tests -q -p no:cacheprovider -rfEs $xdist \
  --junitxml="$out/tests.xml"

if want sanitizer; then
  # Every kernel once or twice at small shapes (scripts/sanitize_ops.py: the test suite under racecheck takes
  # hours). Each tensor gets its own allocation (no caching allocator) so an out-of-bounds access cannot land
  # silently in a neighbouring tensor; only swiftlora's kernels are instrumented.
  # racecheck stops at any cuBLAS GEMM on the H100, so it leaves out the steps that call cuBLAS and checks the
  # fused logits kernel (lm_head_fused's) through its standalone micro instead, which has host references.
  for tool in memcheck racecheck synccheck; do
    step "sanitizer-$tool" 900 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=python:. \
      compute-sanitizer --tool "$tool" --error-exitcode 17 --kernel-name kns=swiftlora --print-limit 20 \
      "$PY" scripts/sanitize_ops.py $([ "$tool" = racecheck ] && echo --without-cublas)
  done
  if [[ $SWIFTLORA_CUDA_ARCHS == *90a* ]]; then
    step sanitizer-racecheck-logits-micro 600 env LSM_SANITIZE=1 bash bench/micro/logits_softmax/run.sh
  fi
fi
# Opt-in (STEPS="sanitizer-tests"): memcheck over the ops' whole gpu test suite (slow).
want sanitizer-tests && step sanitizer-tests-memcheck 3600 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=python:. \
  compute-sanitizer --tool memcheck --error-exitcode 17 --kernel-name kns=swiftlora --print-limit 20 \
  "$PY" -m pytest tests/ops -m gpu -q -x -p no:cacheprovider

BENCH_OPS=${BENCH_OPS:-rms_norm,rope,swiglu,geglu,cross_entropy,fused_linear_cross_entropy,token_logprobs}
want bench && step bench 900 env PYTHONPATH=python:. "$PY" -m bench.kernels --ops "$BENCH_OPS" \
  --out "$out/bench" ${PEERS:+--peers "$PEERS"}

# Opt-in (STEPS="build bench-gguf"): GGUF quantizer kernels vs copy bandwidth, and the 8B Q4_K_M export (needs
# gguf and peft importable, e.g. PYTHONPATH=python:.:<folder holding them>).
want bench-gguf && step bench-gguf-quant 900 env PYTHONPATH="python:.${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.ops.gguf_quant --out "$out/bench"
want bench-gguf && step bench-gguf-export 900 env PYTHONPATH="python:.${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.gguf_export --out "$out/bench"

# Last, since it replaces python/swiftlora/_C: a CPU-only build must say how to rebuild when given CUDA tensors.
if want cpu-only; then
  step cpu-only-build 600 env PYTHON="$PY" SWIFTLORA_FORCE_CPU=ON bash scripts/dev_build.sh
  step cpu-only-tests 300 env PYTHONPATH=python:. "$PY" -m pytest tests/test_build.py tests/ops -q -p no:cacheprovider -rfEs
fi

echo; echo "================ summary"; cat "$summary"
exit $overall
