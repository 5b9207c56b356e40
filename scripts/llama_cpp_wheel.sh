#!/usr/bin/env bash
# Builds (or reuses) a CPU-only llama-cpp-python wheel and installs it into $PY: the GGUF export tests load every
# exported file in llama.cpp through it. PyPI has only its source package (a ~5 min compile on 2 cores), so the
# wheel (py3-none-linux: it loads llama.cpp through ctypes) is cached per version in $SWIFTLORA_WHEEL_CACHE
# (default ~/.cache/swiftlora-wheels).
#   PY=/path/to/python bash scripts/llama_cpp_wheel.sh        # or sourced by scripts/_env.sh (PY is set there)
# SWIFTLORA_SKIP_LLAMA_CPP=1 skips it (the llama.cpp tests then skip through pytest.importorskip).
set -euo pipefail
PY=${PY:-python3}
version=${SWIFTLORA_LLAMA_CPP_VERSION:-0.3.36}
cache=${SWIFTLORA_WHEEL_CACHE:-$HOME/.cache/swiftlora-wheels}
if [ -n "${SWIFTLORA_SKIP_LLAMA_CPP:-}" ]; then echo "llama-cpp-python: skipped (SWIFTLORA_SKIP_LLAMA_CPP)"; exit 0; fi
installed=$("$PY" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)
if [ "$installed" = "$version" ]; then
  echo "llama-cpp-python $version already installed"; exit 0
fi
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version (CPU only) into $cache; log: $cache/build-$version.log"
  start=$(date +%s)
  # Portable CPU build: no -march=native (the cache may move between machines), no BLAS, no OpenMP runtime
  # dependency, none of llama.cpp's tools or examples (only the shared libraries the Python package loads).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
    "$PY" -m pip wheel --disable-pip-version-check --no-deps --no-binary=llama-cpp-python \
      "llama-cpp-python==$version" -w "$cache" >"$cache/build-$version.log" 2>&1 \
    || { tail -n 40 "$cache/build-$version.log"; echo "llama-cpp-python build failed" >&2; exit 1; }
  echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
  wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
# Its runtime deps (numpy, typing-extensions, jinja2: already there; diskcache: small, pure) without upgrades.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$wheel" "diskcache>=5.6.1"
echo "llama-cpp-python $version installed from $wheel"
