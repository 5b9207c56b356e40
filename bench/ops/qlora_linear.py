"""QLoRA linear benchmark: x [4096, 4096] bf16, W [14336, 4096] NF4 (double-quantized, blocksize 64), LoRA r = 16
(A, B bf16, scale 2), y = x @ Wᵀ + 2 (x @ Aᵀ) @ Bᵀ. fwd+bwd: grad_x, grad_A, grad_B.

Compute-bound: the floor is the matmul FLOPs (TFLOP/s column) and the yardstick the "gemm" provider, the bf16 cuBLAS
GEMM on a pre-dequantized weight in the same run (issue 4's target: our forward <= 1.10x its time).
  FLOPs    fwd 2 M N K + 2 M r (K + N)                       (481.0 + 1.2 GFLOP)
           fwd+bwd adds grad_x 2 M N K + 2 M r (N + K), grad_A 2 M r K, grad_B 2 M r N
  bytes    fwd reads x (M K E), the packed weight (N K / 2) and its scales (N K / 64), writes y (M N E)
           bwd reads grad_y and the weight again, x (for grad_A), writes grad_x
Providers: swiftlora (qlora_linear, default plan: on sm_90a the forward through the fused kernel, the NF4
dequantization inside the wgmma GEMM and the LoRA term as one more k-tile; the backward dequantizes + cuBLAS),
swiftlora_v1 (plan chunks=1: one dequantization, then one cuBLAS GEMM, in the forward too), swiftlora_chunked (plan
chunks=4: the dequantization pipelined under the GEMM in 4 chunks), swiftlora_a64 (v1 with the LoRA columns padded to
a multiple of 64: K + r' = 4160 instead of 4112), torch (its plain-PyTorch reference: dequantize in PyTorch ops, then
matmuls), gemm (the yardstick, no LoRA), peft (PEFT LoRA over a bitsandbytes Linear4bit), unsloth (its LoRA_W
function, what Unsloth runs for o_proj).
"""
from __future__ import annotations

import torch

from . import _lora
from .common import Case, autograd_bench, import_swiftlora_ops, import_unsloth, leaf, require_cuda

OP = "qlora_linear"


def cases(quick: bool) -> list[Case]:
    m, k, n, r = (256, 512, 1024, 8) if quick else (4096, 4096, 14336, 16)
    dtype = torch.bfloat16
    e = dtype.itemsize
    weight = n * k // 2 + n * k // _lora.BLOCKSIZE
    fwd = m * k * e + weight + m * n * e
    bwd = m * n * e + weight + m * k * e + m * k * e
    flops_fwd = _lora.matmul_flops(m, n, k) + 2 * m * r * (k + n)
    flops_bwd = _lora.matmul_flops(m, n, k) + 2 * m * r * (n + k) + 2 * m * r * k + 2 * m * r * n
    return [Case("", f"x[{m},{k}],W[{n},{k}]nf4,r={r}", dtype, {"m": m, "k": k, "n": n, "r": r}, fwd, fwd + bwd,
                 flops_fwd, flops_fwd + flops_bwd)]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    d = case.dims
    a, b = _lora.lora_factors(d["n"], d["k"], d["r"], case.dtype, device)
    x = torch.randn(d["m"], d["k"], device=device).to(case.dtype)
    proj = {"nf4": _lora.nf4_tensors(d["n"], d["k"], device), "a": a, "b": b, "scale": _lora.LORA_ALPHA_OVER_R}
    return {"x": leaf(x), "o_proj": proj}


def reference(case: Case, inp: dict):
    (lora_reference,) = import_swiftlora_ops("lora_reference")
    with torch.no_grad():
        return (lora_reference(inp["x"], _lora.projection(inp, "o_proj")),)


def _wrt(inp: dict) -> list:
    return [inp["x"], inp["o_proj"]["a"], inp["o_proj"]["b"]]


def swiftlora(case: Case, inp: dict, provider: str = "swiftlora"):
    (qlora_linear,) = import_swiftlora_ops("qlora_linear")
    p = _lora.projection(inp, "o_proj")
    x = inp["x"]
    fn, note = _lora.planned(provider, lambda: qlora_linear(x, p.base, p.lora_a, p.lora_b, p.scale))
    return autograd_bench(fn, _wrt(inp), [_grad_like(case, x)], notes=[note])


def torch_reference(case: Case, inp: dict):
    (lora_reference,) = import_swiftlora_ops("lora_reference")
    p = _lora.projection(inp, "o_proj")
    x = inp["x"]
    return autograd_bench(lambda: lora_reference(x, p), _wrt(inp), [_grad_like(case, x)],
                          notes=["eager: dequantize with PyTorch ops, then matmuls"])


def gemm(case: Case, inp: dict):
    """The yardstick: y = x @ Wᵀ on the pre-dequantized bf16 weight (fwd), + grad_x = grad_y @ W (fwd+bwd)."""
    x = inp["x"].detach()
    w = _lora.dequantized(inp, "o_proj")
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    dy = torch.randn_like(y)
    dx = torch.empty_like(x)

    def fwd():
        return torch.mm(x, w.t(), out=y)

    def fwd_bwd():
        fwd()
        return torch.mm(dy, w, out=dx)

    return _lora.yardstick(fwd, fwd_bwd, "bf16 cuBLAS on the dequantized W")


def peft(case: Case, inp: dict):
    module, params = _lora.peft_module(inp, ["o_proj"], case.dims["r"])
    x = inp["x"]
    return autograd_bench(lambda: module.o_proj(x), [x, *params], [_grad_like(case, x)],
                          notes=["peft Linear4bit (bitsandbytes matmul_4bit) + LoRA in bf16"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth.kernels.fast_lora import apply_lora_o

    module, params = _lora.peft_module(inp, ["o_proj"], case.dims["r"])
    x = inp["x"]
    return autograd_bench(lambda: apply_lora_o(module, _lora.three_d(x)), [x, *params],
                          [_grad_like(case, x).unsqueeze(0)], canonical=lambda outs: (outs[0][0],),
                          notes=["unsloth.kernels.fast_lora.apply_lora_o (LoRA_W)"])


def _grad_like(case: Case, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], case.dims["n"])


PROVIDERS = {"swiftlora": swiftlora, **{v: (lambda c, i, v=v: swiftlora(c, i, v)) for v in
                                         ("swiftlora_v1", "swiftlora_chunked", "swiftlora_a64")},
             "torch": torch_reference, "gemm": gemm, "peft": peft, "unsloth": unsloth}
