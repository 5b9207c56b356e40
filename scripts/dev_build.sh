#!/usr/bin/env bash
# Developer loop: build swiftlora._C into build/dev-<tag> and drop it into python/swiftlora/, so tests run from the
# source tree with PYTHONPATH=python (no pip install; several checkouts can build side by side).
#   bash scripts/dev_build.sh   # with the active python's torch; SWIFTLORA_CUDA_ARCHS / _FORCE_CPU apply;
#                               # NO_COPY=1 only compiles (e.g. a CUDA compile check on a machine without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PATH="$(dirname "$(command -v "$PY")"):$PATH"   # the venv's cmake/ninja first
tag=$($PY -c "import torch, sys; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}')")
build="build/dev-$tag${SWIFTLORA_FORCE_CPU:+-cpuonly}"
mkdir -p build
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  ${SWIFTLORA_CUDA_ARCHS:+-DSWIFTLORA_CUDA_ARCHS="$SWIFTLORA_CUDA_ARCHS"} \
  ${SWIFTLORA_FORCE_CPU:+-DSWIFTLORA_FORCE_CPU="$SWIFTLORA_FORCE_CPU"} >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${JOBS:-2}"
if [ -n "${NO_COPY:-}" ]; then echo "built $(ls "$build"/_C*.so) (NO_COPY: compile check only)"; exit 0; fi
cp "$build"/_C*.so python/swiftlora/
echo "built $(ls "$build"/_C*.so) -> python/swiftlora/"
