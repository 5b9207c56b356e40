#!/usr/bin/env bash
# The README's test command: on a fresh machine, builds swiftlora and runs the test suite in each build mode.
#   bash scripts/test.sh                 # modes "cpu cuda" (cuda only where nvcc exists), all tests
#   SWIFTLORA_TEST_MODES=cpu bash scripts/test.sh -k rms_norm     # extra args go to pytest
# cpu : CPU torch, CPU-only extension, the whole suite.
# cuda: CUDA torch, kernels compiled for SWIFTLORA_CUDA_ARCHS (default "80;90a"), the whole suite (gpu tests run
#       when a GPU is visible and skip otherwise), so a broken .cu file fails here even on a machine without a GPU.
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
    echo; echo "== tests ($mode)"
    cd "$SWIFTLORA_ROOT" && "$PY" -m pytest tests -q -p no:cacheprovider "$@" ) || status=1
  echo "== mode $mode finished in $(( $(date +%s) - start )) s (status so far: $status)"
done
exit $status
