#!/usr/bin/env bash
# The README's test command: on a fresh machine, builds swiftlora and runs the test suite in each build mode.
#   bash scripts/test.sh                 # modes "cpu cuda" (cuda only where nvcc exists), all tests
#   SWIFTLORA_TEST_MODES=cpu bash scripts/test.sh -k rms_norm     # extra args go to pytest
# cpu : CPU torch, CPU-only extension, the whole suite.
# cuda: CUDA torch, kernels compiled for SWIFTLORA_CUDA_ARCHS (default "80;90a"), so a broken .cu file fails here
#       even on a machine without a GPU; then the op-level tests (tests/ops, nn, quant, test_build: gpu tests run
#       when a GPU is visible and skip otherwise). With a GPU visible it runs the whole suite. The integration tests
#       (models, train, export) run in the cpu mode: without a GPU both builds run the same CPU kernels there, and
#       running them twice would double CI's longest part. SWIFTLORA_CUDA_TESTS overrides the paths.
set -euo pipefail
cd "$(dirname "$0")/.."
modes=${SWIFTLORA_TEST_MODES:-cpu cuda}
if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  echo "no nvcc found: skipping the cuda build mode"; modes=${modes//cuda/}
fi
status=0
for mode in $modes; do
  start=$(date +%s)
  ( source scripts/_env.sh "$mode"
    paths=tests
    if [ "$mode" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      paths=${SWIFTLORA_CUDA_TESTS:-tests/ops tests/nn tests/quant tests/test_build.py}
    fi
    echo; echo "== tests ($mode: $paths)"
    cd "$SWIFTLORA_ROOT" && "$PY" -m pytest $paths -q -p no:cacheprovider "$@" ) || status=1
  echo "== mode $mode finished in $(( $(date +%s) - start )) s (status so far: $status)"
done
exit $status
