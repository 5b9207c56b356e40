#!/usr/bin/env bash
# The README's main-job command. Until the fine-tuning workflow lands, the main job is the kernel benchmark on
# whatever device is present: CUDA build and GPU shapes when a GPU is visible, else the CPU build with small shapes.
#   bash scripts/demo.sh [extra bench.kernels args, e.g. --peers DIR --tag NAME]
# On a GPU the peers (liger, unsloth) are benchmarked too when given: --peers DIR, or SWIFTLORA_PEERS=DIR or a
# .tar.gz of one (as ../shared/device/wheelhouse.sh builds), or .whl/peers.tar.gz when it exists. Each peer runs in
# its own subprocess with that directory first on PYTHONPATH; this process never imports it.
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
peer_args=()
if [ "$mode" = cuda ] && [[ " $* " != *" --peers "* ]]; then
  peers=${SWIFTLORA_PEERS:-}
  if [ -z "$peers" ] && [ -f .whl/peers.tar.gz ]; then peers=.whl/peers.tar.gz; fi
  if [[ "$peers" == *.tar.gz ]]; then
    rm -rf build/peers && mkdir -p build/peers && tar xzf "$peers" -C build/peers && peers=build/peers
  fi
  if [ -n "$peers" ]; then peer_args=(--peers "$peers"); fi
fi
exec "$PY" -m bench.kernels --ops rms_norm,rope,swiglu,geglu "${size_args[@]}" "${peer_args[@]}" "$@"
