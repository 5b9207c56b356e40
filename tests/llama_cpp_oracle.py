"""llama.cpp itself as the test oracle, through llama-cpp-python (built by scripts/llama_cpp_wheel.sh).

``ggml_quantize``: llama.cpp's own block quantizer (``ggml_quantize_chunk`` of the libggml-base shipped in the
wheel, without importance matrix: what llama-quantize runs). ``llama_logits``: load a GGUF in llama.cpp and return
its logits for given token ids. Tests call ``require_llama_cpp()`` first, which skips them when the package is
missing.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np
import pytest


def require_llama_cpp():
    """The llama_cpp module, or a pytest skip when llama-cpp-python is not installed."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/llama_cpp_wheel.sh)")


@lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    llama_cpp = require_llama_cpp()
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = [n for n in os.listdir(libdir) if n.startswith("libggml-base")]
    if not names:
        raise FileNotFoundError(f"no libggml-base in {libdir}: {sorted(os.listdir(libdir))}")
    lib = ctypes.CDLL(os.path.join(libdir, sorted(names)[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: int, bytes_per_row: int) -> np.ndarray:
    """llama.cpp's bytes for float32 rows ``x`` [rows, n] -> uint8 [rows, bytes_per_row]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, bytes_per_row), dtype=np.uint8)
    written = _ggml_base().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes, f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}"
    return out


def llama_logits(path: str, token_ids: list[int], n_ctx: int = 512) -> np.ndarray:
    """float32 [len(token_ids), n_vocab]: llama.cpp's next-token logits at every position (CPU, one thread pool)."""
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=max(n_ctx, len(token_ids) + 8),
                          n_batch=512, n_gpu_layers=0, n_threads=2, verbose=True)  # verbose: loader errors
    try:
        llm.reset()
        llm.eval(list(token_ids))
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()
