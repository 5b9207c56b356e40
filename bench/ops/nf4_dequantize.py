"""NF4 dequantize: W [14336, 4096] double-quantized (blocksize 64) -> bf16. Inference-style op: no backward.

Floor: read the packed codes (n/2 bytes) and the scales (uint8 absmax, fp32 absmax2, the 1 KiB map), write n bf16
outputs: 29.36 + 0.92 + 117.44 MB = 147.7 MB, 0.049 ms at 3.0 TB/s. Target (issue 4): <= 0.052 ms.
"""
from __future__ import annotations

import torch

from ._nf4 import BLOCKSIZE, K, N, QUICK_K, QUICK_N, bnb_state, quantized_weight, unsloth_utils, weight_bytes
from .common import Bench, Case, import_swiftlora_ops, require_cuda

OP = "nf4_dequantize"


def cases(quick: bool) -> list[Case]:
    n, k = (QUICK_N, QUICK_K) if quick else (N, K)
    dtype = torch.bfloat16
    floor = weight_bytes(n, k) + n * k * dtype.itemsize
    return [Case("", f"W[{n},{k}] nf4-dq bs{BLOCKSIZE}", dtype, {"n": n, "k": k}, floor, floor)]


def make_inputs(case: Case, device) -> dict:
    return quantized_weight(case.dims["n"], case.dims["k"], case.dtype, device)


def _args(inp: dict):
    return (inp["packed"], *inp["state"].kernel_args())


def reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("nf4_dequantize_reference")
    return (ref(*_args(inp), blocksize=BLOCKSIZE, shape=inp["state"].shape, dtype=case.dtype),)


def _bench(fn, notes=()) -> Bench:
    return Bench(fwd=fn, fwd_bwd=None, output=lambda: (fn(),), notes=list(notes))


def swiftlora(case: Case, inp: dict):
    (nf4_dequantize,) = import_swiftlora_ops("nf4_dequantize")
    args, shape = _args(inp), inp["state"].shape
    return _bench(lambda: nf4_dequantize(*args, blocksize=BLOCKSIZE, shape=shape, dtype=case.dtype))


def torch_reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("nf4_dequantize_reference")
    args, shape = _args(inp), inp["state"].shape
    return _bench(lambda: ref(*args, blocksize=BLOCKSIZE, shape=shape, dtype=case.dtype), ["eager"])


def bitsandbytes(case: Case, inp: dict):
    bnb, state = bnb_state(inp)
    packed = inp["packed"]
    return _bench(lambda: bnb.functional.dequantize_4bit(packed, state),
                  [f"bnb {bnb.__version__} dequantize_4bit (nested absmax: dequantize_blockwise, then += offset)"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    utils = unsloth_utils()
    _, state = bnb_state(inp)
    packed = inp["packed"]
    return _bench(lambda: utils.fast_dequantize(packed, state), ["fast_dequantize (bnb C kernels via ctypes)"])


PROVIDERS = {"swiftlora": swiftlora, "torch": torch_reference, "bitsandbytes": bitsandbytes, "unsloth": unsloth}
