"""GeGLU benchmark: h = gelu(gate) * up, gate and up [4096, 14336] bf16, two cases: the exact (erf) GELU and the
tanh approximation. Floor: see _glu.py (fwd 3 T, fwd+bwd 8 T). Liger has the tanh form only."""
from __future__ import annotations

import torch

from . import _glu
from .common import Case, Unavailable, import_swiftlora_ops, require_cuda

OP = "geglu"
make_inputs = _glu.make_inputs


def cases(quick: bool) -> list[Case]:
    return [_glu.glu_case("none", quick), _glu.glu_case("tanh", quick)]


def reference(case: Case, inp: dict):
    (geglu_reference,) = import_swiftlora_ops("geglu_reference")
    with torch.no_grad():
        return (geglu_reference(inp["gate"], inp["up"], approximate=case.name),)


def swiftlora(case: Case, inp: dict):
    (geglu,) = import_swiftlora_ops("geglu")
    return _glu.function_bench(lambda g, u: geglu(g, u, approximate=case.name), inp)


def swiftlora_inplace(case: Case, inp: dict):
    (geglu,) = import_swiftlora_ops("geglu")
    return _glu.inplace_bench(lambda g, u: geglu(g, u, approximate=case.name, inplace_backward=True), inp)


def torch_reference(case: Case, inp: dict):
    (geglu_reference,) = import_swiftlora_ops("geglu_reference")
    return _glu.function_bench(lambda g, u: geglu_reference(g, u, approximate=case.name), inp, notes=["eager"])


def liger(case: Case, inp: dict):
    if case.name != "tanh":
        raise Unavailable("liger's GeGLU (LigerGELUMulFunction) is the tanh approximation only")
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerGELUMulFunction

    return _glu.liger_bench(LigerGELUMulFunction, inp)


def unsloth(case: Case, inp: dict):
    kind = "exact" if case.name == "none" else "approx"
    fwd, bwd = _glu.unsloth_kernels("geglu", f"geglu_{kind}_forward_kernel", f"geglu_{kind}_backward_kernel", inp)
    return _glu.unsloth_bench(fwd, bwd, inp)


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_inplace": swiftlora_inplace, "torch": torch_reference, "liger": liger, "unsloth": unsloth}
