"""NF4 decode GEMV: y [1, 14336] = x [1, 4096] @ dequant(W [14336, 4096])ᵀ, W double-quantized (blocksize 64),
x bf16. Inference op: no backward.

Floor: read the packed weight and its scales once (x, y: 36 KB): 30.3 MB, 10.1 µs at 3.0 TB/s. Target (issue 4):
>= 80% of that floor (<= 12.6 µs at 3.0 TB/s) and faster than bitsandbytes' 4-bit inference matmul in the run.
The "gemm" row is cuBLAS on the pre-dequantized bf16 W (117 MB read): the yardstick of not quantizing.
"""
from __future__ import annotations

import torch

from ._nf4 import BLOCKSIZE, K, N, QUICK_K, QUICK_N, bnb_state, quantized_weight, unsloth_utils, weight_bytes
from .common import Bench, Case, import_swiftlora_ops, require_cuda

OP = "nf4_gemv"


def cases(quick: bool) -> list[Case]:
    n, k = (QUICK_N, QUICK_K) if quick else (N, K)
    dtype = torch.bfloat16
    floor = weight_bytes(n, k) + (k + n) * dtype.itemsize
    return [Case("", f"x[1,{k}] W[{n},{k}] nf4-dq", dtype, {"n": n, "k": k}, floor, floor, 2 * n * k, 2 * n * k)]


def make_inputs(case: Case, device) -> dict:
    inp = quantized_weight(case.dims["n"], case.dims["k"], case.dtype, device)
    inp["x"] = torch.randn(1, case.dims["k"], device=device).to(case.dtype)
    return inp


def _args(inp: dict):
    return (inp["packed"], *inp["state"].kernel_args())


def reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("nf4_gemv_reference")
    return (ref(inp["x"], *_args(inp), blocksize=BLOCKSIZE, out_features=case.dims["n"]),)


def _bench(fn, notes=()) -> Bench:
    def run():
        with torch.no_grad():
            return fn()

    return Bench(fwd=run, fwd_bwd=None, output=lambda: (run(),), notes=list(notes))


def swiftlora(case: Case, inp: dict):
    (nf4_gemv,) = import_swiftlora_ops("nf4_gemv")
    x, args, n = inp["x"], _args(inp), case.dims["n"]
    return _bench(lambda: nf4_gemv(x, *args, blocksize=BLOCKSIZE, out_features=n))


def torch_reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("nf4_gemv_reference")
    x, args, n = inp["x"], _args(inp), case.dims["n"]
    return _bench(lambda: ref(x, *args, blocksize=BLOCKSIZE, out_features=n, compute_dtype=case.dtype),
                  ["eager dequantize + matmul"])


def gemm(case: Case, inp: dict):
    x, w = inp["x"], inp["w"]
    return _bench(lambda: torch.nn.functional.linear(x, w), ["cuBLAS on the dense bf16 W (not quantized)"])


def bitsandbytes(case: Case, inp: dict):
    bnb, state = bnb_state(inp)
    x, packed = inp["x"], inp["packed"]
    old = tuple(int(v) for v in bnb.__version__.split(".")[:2]) < (0, 50)  # before 0.50 Linear4bit passed W.t()
    w = packed.t() if old else packed
    return _bench(lambda: bnb.matmul_4bit(x, w, quant_state=state),
                  [f"bnb {bnb.__version__} matmul_4bit as Linear4bit calls it (no grad)"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    utils = unsloth_utils()
    _, state = bnb_state(inp)
    x3, packed = inp["x"].view(1, 1, -1), inp["packed"]
    return _bench(lambda: utils.fast_gemv(x3, packed, state).view(1, -1), ["fast_gemv (bnb's naive gemv kernel)"])


PROVIDERS = {"swiftlora": swiftlora, "torch": torch_reference, "gemm": gemm, "bitsandbytes": bitsandbytes,
             "unsloth": unsloth}
