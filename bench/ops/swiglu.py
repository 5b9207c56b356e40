"""SwiGLU benchmark: h = silu(gate) * up, gate and up [4096, 14336] bf16. Floor: see _glu.py (fwd 3 T, fwd+bwd 8 T)."""
from __future__ import annotations

import torch

from . import _glu
from .common import Case, import_swiftlora_ops, require_cuda

OP = "swiglu"
make_inputs = _glu.make_inputs


def cases(quick: bool) -> list[Case]:
    return [_glu.glu_case("", quick)]


def reference(case: Case, inp: dict):
    (swiglu_reference,) = import_swiftlora_ops("swiglu_reference")
    with torch.no_grad():
        return (swiglu_reference(inp["gate"], inp["up"]),)


def swiftlora(case: Case, inp: dict):
    (swiglu,) = import_swiftlora_ops("swiglu")
    return _glu.function_bench(swiglu, inp)


def swiftlora_inplace(case: Case, inp: dict):
    (swiglu,) = import_swiftlora_ops("swiglu")
    return _glu.inplace_bench(lambda g, u: swiglu(g, u, inplace_backward=True), inp)


def torch_reference(case: Case, inp: dict):
    (swiglu_reference,) = import_swiftlora_ops("swiglu_reference")
    return _glu.function_bench(swiglu_reference, inp, notes=["eager"])


def liger(case: Case, inp: dict):
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerSiLUMulFunction

    return _glu.liger_bench(LigerSiLUMulFunction, inp)


def unsloth(case: Case, inp: dict):
    fwd, bwd = _glu.unsloth_kernels("swiglu", "swiglu_fg_kernel", "swiglu_DWf_DW_dfg_kernel", inp)
    return _glu.unsloth_bench(fwd, bwd, inp)


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_inplace": swiftlora_inplace, "torch": torch_reference, "liger": liger, "unsloth": unsloth}
