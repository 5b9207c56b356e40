"""LoRA MLP block benchmark (Llama-8B MLP): x [4096, 4096] bf16, gate/up [14336, 4096] and down [4096, 14336] NF4
(double-quantized, blocksize 64), LoRA r = 16 on all three (bf16, scale 2), SwiGLU:
y = down(silu(gate(x)) · up(x)). fwd+bwd: grad_x and the six LoRA factors' gradients.

Compute-bound; floor = the six big GEMMs (three forward, three grad-input; saving gate/up means no forward GEMM is
redone in the backward): 6 · 2 M K F = 2.89 TFLOP, 3.87 ms at ~746 TFLOP/s (issue 4's target: fwd+bwd <= 4.3 ms;
Unsloth measured 5.26 ms and PEFT + bitsandbytes 6.19 ms on the H100).
  FLOPs    fwd 3 · 2 M K F + LoRA 3 · 2 M r (K + F); fwd+bwd twice the GEMMs + LoRA (grad_xa, grad_A, grad_B, dx)
  bytes    weights 3 (K F / 2 + K F / 64) per pass; activations x, gate, up, h, y in the forward (M (2K + 3F) E),
           grad_y, dh, d gate/up, grad_x in the backward
Providers: swiftlora (lora_mlp, default plan: on sm_90a the forward's three projections through the fused kernel,
the NF4 dequantization inside the wgmma GEMM; the backward dequantizes + cuBLAS), swiftlora_v1 (plan chunks=1: one
dequantization then one cuBLAS GEMM per op, gate+up as one panel GEMM), swiftlora_chunked (plan chunks=4: each NF4
weight dequantized in 4 chunks pipelined under the GEMMs), swiftlora_a64 (v1, the gate/up panel's LoRA columns
padded to a multiple of 64), torch (the plain-PyTorch reference: dequantize in PyTorch ops, three LoRA linears,
swiglu_reference), gemm (the six bf16 GEMMs on pre-dequantized weights, nothing else: the yardstick), peft (PEFT
LoRA over bitsandbytes Linear4bit, HF LlamaMLP's forward), unsloth (its LoRA_MLP with SwiGLU kernels, in place).
"""
from __future__ import annotations

import torch

from ..harness import Restore
from . import _lora
from .common import Case, autograd_bench, import_swiftlora_ops, import_unsloth, leaf, require_cuda

OP = "lora_mlp"
NAMES = ("gate_proj", "up_proj", "down_proj")


def cases(quick: bool) -> list[Case]:
    m, k, f, r = (256, 512, 1024, 8) if quick else (4096, 4096, 14336, 16)
    dtype = torch.bfloat16
    e = dtype.itemsize
    weights = 3 * (k * f // 2 + k * f // _lora.BLOCKSIZE)
    fwd = weights + m * (2 * k + 3 * f) * e
    bwd = weights + m * (2 * k + 5 * f) * e
    gemms = 3 * _lora.matmul_flops(m, f, k)
    lora = 3 * 2 * m * r * (k + f)
    return [Case("", f"x[{m},{k}],F={f},nf4,r={r}", dtype, {"m": m, "k": k, "f": f, "r": r}, fwd, fwd + bwd,
                 gemms + lora, 2 * gemms + 4 * lora)]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    d = case.dims
    inp = {"x": leaf(torch.randn(d["m"], d["k"], device=device).to(case.dtype))}
    for name, (n, k) in zip(NAMES, ((d["f"], d["k"]), (d["f"], d["k"]), (d["k"], d["f"]))):
        a, b = _lora.lora_factors(n, k, d["r"], case.dtype, device)
        inp[name] = {"nf4": _lora.nf4_tensors(n, k, device), "a": a, "b": b, "scale": _lora.LORA_ALPHA_OVER_R}
    return inp


def _projs(inp: dict) -> list:
    return [_lora.projection(inp, n) for n in NAMES]


def _wrt(inp: dict) -> list:
    return [inp["x"]] + [inp[n][key] for n in NAMES for key in ("a", "b")]


def reference(case: Case, inp: dict):
    (lora_mlp_reference,) = import_swiftlora_ops("lora_mlp_reference")
    with torch.no_grad():
        return (lora_mlp_reference(inp["x"], *_projs(inp)),)


def swiftlora(case: Case, inp: dict, provider: str = "swiftlora"):
    (lora_mlp,) = import_swiftlora_ops("lora_mlp")
    projs, x = _projs(inp), inp["x"]
    fn, note = _lora.planned(provider, lambda: lora_mlp(x, *projs))
    return autograd_bench(fn, _wrt(inp), [x], notes=[note + "; gate+up share x; in-place SwiGLU backward"])


def torch_reference(case: Case, inp: dict):
    (lora_mlp_reference,) = import_swiftlora_ops("lora_mlp_reference")
    projs, x = _projs(inp), inp["x"]
    return autograd_bench(lambda: lora_mlp_reference(x, *projs), _wrt(inp), [x],
                          notes=["eager: PyTorch dequantize + matmuls, swiglu_reference"])


def gemm(case: Case, inp: dict):
    """The yardstick: gu = x @ [W_gate; W_up]ᵀ, y = h @ W_downᵀ (fwd); + dh = dy @ W_down, dx = dgu @ [W_gate; W_up]
    (fwd+bwd), on pre-dequantized bf16 weights with preallocated outputs; h and dgu are fixed random buffers."""
    x = inp["x"].detach()
    w_gu = torch.cat([_lora.dequantized(inp, "gate_proj"), _lora.dequantized(inp, "up_proj")])
    w_d = _lora.dequantized(inp, "down_proj")
    m, f = x.shape[0], w_d.shape[1]
    gu = torch.empty(m, 2 * f, device=x.device, dtype=x.dtype)
    h = torch.randn(m, f, device=x.device, dtype=x.dtype)
    y = torch.empty(m, w_d.shape[0], device=x.device, dtype=x.dtype)
    dy, dh, dx = torch.randn_like(y), torch.empty_like(h), torch.empty_like(x)

    def fwd():
        torch.mm(x, w_gu.t(), out=gu)
        return torch.mm(h, w_d.t(), out=y)

    def fwd_bwd():
        fwd()
        torch.mm(dy, w_d, out=dh)
        return torch.mm(gu, w_gu, out=dx)

    return _lora.yardstick(fwd, fwd_bwd, "3 (6) bf16 cuBLAS GEMMs, no activation")


def _peft_mlp(case: Case, inp: dict):
    """HF LlamaMLP's shape (gate_proj, up_proj, down_proj: bitsandbytes Linear4bit) with PEFT LoRA injected."""
    return _lora.peft_module(inp, list(NAMES), case.dims["r"])


def peft(case: Case, inp: dict):
    mlp, params = _peft_mlp(case, inp)
    x = inp["x"]

    def fn():
        return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    return autograd_bench(fn, [x, *params], [x], notes=["HF LlamaMLP forward over peft Linear4bit modules"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth.kernels.fast_lora import apply_lora_mlp_swiglu

    mlp, params = _peft_mlp(case, inp)
    x = inp["x"]
    # inplace=True (its default): the backward writes grad_x into x's buffer, so x is restored (untimed) each call.
    return autograd_bench(lambda: apply_lora_mlp_swiglu(mlp, _lora.three_d(x)), [x, *params], [x.unsqueeze(0)],
                          canonical=lambda outs: (outs[0][0],), restore=Restore(x),
                          notes=["unsloth.kernels.fast_lora.apply_lora_mlp_swiglu (LoRA_MLP, inplace); x restored"])


PROVIDERS = {"swiftlora": swiftlora, **{v: (lambda c, i, v=v: swiftlora(c, i, v)) for v in
                                         ("swiftlora_v1", "swiftlora_chunked", "swiftlora_a64")},
             "torch": torch_reference, "gemm": gemm, "peft": peft, "unsloth": unsloth}
