"""RMSNorm benchmark: x [16384, 4096] bf16 (Llama-8B hidden, 16k tokens), weight [4096], eps 1e-6.

Floor, E = element size, N = rows * hidden:
  fwd      reads x, w; writes y and rstd (fp32 per row)          2 N E + H E + 4 rows
  bwd      reads dy, x, rstd, w; writes dx, dw                    3 N E + 4 rows + 2 H E
The dw reduction's partials (one fp32 row per block) depend on the kernel and are not counted.
Case "frozen-w": the weight needs no gradient (LoRA/QLoRA training, the common case): bwd without dw. Unsloth's
RMSNorm never computes dw, so it is compared on this case only.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import Case, Unavailable, autograd_bench, import_swiftlora_ops, import_unsloth, leaf, require_cuda

OP = "rms_norm"
EPS = 1e-6


def cases(quick: bool) -> list[Case]:
    rows, hidden = (256, 512) if quick else (16384, 4096)
    dtype = torch.bfloat16
    e, n = dtype.itemsize, rows * hidden
    fwd = 2 * n * e + hidden * e + 4 * rows
    bwd = 3 * n * e + 4 * rows + 2 * hidden * e
    bwd_frozen = 3 * n * e + 4 * rows + hidden * e
    shape, dims = f"x[{rows},{hidden}]", {"rows": rows, "hidden": hidden}
    return [Case("", shape, dtype, dims, fwd, fwd + bwd), Case("frozen-w", shape, dtype, dims, fwd, fwd + bwd_frozen)]


def _wrt(case: Case, inp: dict) -> list:
    """The inputs that get gradients: x, and w unless the case freezes it."""
    return [inp["x"]] if case.name == "frozen-w" else [inp["x"], inp["w"]]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    d = case.dims
    x = torch.randn(d["rows"], d["hidden"], device=device, dtype=case.dtype)
    w = 1 + 0.1 * torch.randn(d["hidden"], device=device, dtype=case.dtype)
    return {"x": leaf(x), "w": leaf(w)}


def reference(case: Case, inp: dict):
    (rms_norm_reference,) = import_swiftlora_ops("rms_norm_reference")
    with torch.no_grad():
        return (rms_norm_reference(inp["x"], inp["w"], EPS, False),)


def swiftlora(case: Case, inp: dict):
    (rms_norm,) = import_swiftlora_ops("rms_norm")
    x, w = inp["x"], _weight(case, inp)
    return autograd_bench(lambda: rms_norm(x, w, EPS), _wrt(case, inp), [x])


def swiftlora_inplace(case: Case, inp: dict):
    """inplace_backward=True: dx is written into dy's buffer (what a fused block uses); dy restored untimed."""
    (rms_norm,) = import_swiftlora_ops("rms_norm")
    x, w = inp["x"], _weight(case, inp)
    bench = autograd_bench(lambda: rms_norm(x, w, EPS, inplace_backward=True), _wrt(case, inp), [x],
                           notes=["inplace_backward"])
    return bench


def _weight(case: Case, inp: dict) -> torch.Tensor:
    return inp["w"].detach() if case.name == "frozen-w" else inp["w"]


def torch_reference(case: Case, inp: dict):
    (rms_norm_reference,) = import_swiftlora_ops("rms_norm_reference")
    x, w = inp["x"], _weight(case, inp)
    return autograd_bench(lambda: rms_norm_reference(x, w, EPS, False), _wrt(case, inp), [x], notes=["eager"])


def liger(case: Case, inp: dict):
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerRMSNormFunction  # what LigerRMSNorm uses

    x, w = inp["x"], _weight(case, inp)
    # (X, W, eps, offset, casting_mode, in_place): in_place=False keeps dy intact, like our default; liger's own
    # default (True) writes dx into dy, which saves memory but moves the same bytes.
    fn = lambda: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)  # noqa: E731
    return autograd_bench(fn, _wrt(case, inp), [x], notes=["casting_mode=llama, in_place=False"])


def unsloth(case: Case, inp: dict):
    if case.name != "frozen-w":
        raise Unavailable("unsloth's fast_rms_layernorm computes no weight gradient (see the frozen-w case)")
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth.kernels.rms_layernorm import fast_rms_layernorm

    x, w = inp["x"], _weight(case, inp)
    layer = SimpleNamespace(weight=w, variance_epsilon=EPS)  # fast_rms_layernorm reads .weight and the eps
    return autograd_bench(lambda: fast_rms_layernorm(layer, x, gemma=False), _wrt(case, inp), [x])


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_inplace": swiftlora_inplace, "torch": torch_reference,
             "liger": liger, "unsloth": unsloth}
