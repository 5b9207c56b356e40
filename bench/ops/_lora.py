"""Shared by the QLoRA specs (qlora_linear, lora_mlp): NF4 inputs, the bf16 GEMM yardstick, and the peers' modules.

Every NF4 weight is made from random codes and scales (seeded, the same in every process, so the peers' subprocesses
see the same weights): bitsandbytes' layout with double quantization (blocksize 64, uint8 absmax, a 256-entry map
code2, float32 absmax2 and offset). Timings do not depend on the values; scales ~ 1/sqrt(K) keep x @ Wᵀ ~ 1.
The peers get the same tensors wrapped as bitsandbytes ``Params4bit`` in a ``Linear4bit`` with PEFT's LoRA injected
(``peft.inject_adapter_in_model``), and the LoRA factors copied in (bf16, like the compute dtype, for every
provider). Unsloth runs its own LoRA autograd functions on those PEFT modules, as in training.
"""
from __future__ import annotations

import torch

from .common import Bench, Unavailable

BLOCKSIZE = 64
NESTED = 256
LORA_ALPHA_OVER_R = 2.0  # lora_alpha = 2 r: scale 2


def nf4_tensors(n: int, k: int, device) -> dict:
    """Packed codes, uint8 absmax, absmax2, code2 and offset of a double-quantized NF4 [n, k] weight."""
    numel = n * k
    nblocks = -(-numel // BLOCKSIZE)
    return {
        "packed": torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device=device),
        "absmax": torch.randint(0, 256, (nblocks,), dtype=torch.uint8, device=device),
        "absmax2": (torch.rand(-(-nblocks // NESTED), device=device) * 0.5 + 0.25) * k**-0.5,
        "code2": torch.sort(torch.rand(256, device=device) * 2 - 1).values,
        "offset": torch.tensor(k**-0.5, device=device),
        "shape": (n, k),
    }


def lora_factors(n: int, k: int, r: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, k], B [n, r], trainable leaves (B nonzero, unlike PEFT's init, so every term does work)."""
    a = (torch.randn(r, k, device=device) * k**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, r, device=device) * r**-0.5).to(dtype).requires_grad_()
    return a, b


def projection(inp: dict, name: str):
    """swiftlora's LoRAProjection for inp[name] = {"nf4": tensors, "a", "b", "scale"}."""
    from swiftlora.ops import LoRAProjection, NF4Weight

    p = inp[name]
    t = p["nf4"]
    weight = NF4Weight(t["packed"], t["absmax"], t["shape"], BLOCKSIZE, t["absmax2"], t["code2"], t["offset"],
                       dtype=torch.bfloat16)
    return LoRAProjection(weight, p["a"], p["b"], p["scale"])


def dequantized(inp: dict, name: str, dtype=torch.bfloat16) -> torch.Tensor:
    return projection(inp, name).base.dequantize(dtype)


# The qlora plans the specs compare in one run (swiftlora.ops.qlora_plan: chunks, panel_align): the default (on
# sm_90a the forward through the fused kernel, the NF4 dequantization inside the wgmma GEMM; elsewhere and in the
# backward one dequantization into [W | s·B], one cuBLAS GEMM), version 1 (that dequantize + cuBLAS plan in the
# forward too), 4 dequantize/GEMM chunks pipelined on two streams (the memory-saving plan), and version 1 with the
# folded LoRA columns padded to a multiple of 64 (K + r = 4112 -> 4160).
PLANS = {"swiftlora": ((-1, 8), "default plan: fused sm_90a forward where it applies, else dequantize + cuBLAS"),
         "swiftlora_v1": ((1, 8), "v1: one dequantization into [W | s·B], one cuBLAS GEMM"),
         "swiftlora_chunked": ((4, 8), "4 chunks: dequantize chunk i+1 on a side stream under chunk i's GEMM"),
         "swiftlora_a64": ((1, 64), "v1, LoRA columns padded to K + r' = 4160")}


def planned(provider: str, fn):
    """fn run under the provider's qlora plan (the backward keeps its forward's plan), and the plan's note."""
    from .common import import_swiftlora_ops

    (qlora_plan,) = import_swiftlora_ops("qlora_plan")
    plan, note = PLANS[provider]

    def run():
        with qlora_plan(*plan):
            return fn()

    return run, note


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def yardstick(fwd, fwd_bwd, note: str) -> Bench:
    """The "gemm" provider's Bench: bf16 cuBLAS GEMMs alone, nothing to check against the reference."""

    def output():
        raise Unavailable("gemm yardstick: GEMMs only, no LoRA term to check")

    return Bench(fwd=fwd, fwd_bwd=fwd_bwd, output=output, notes=["yardstick: " + note])


# ----------------------------------------------------------------------------------------------------- the peers


def bnb_linear4bit(t: dict, dtype=torch.bfloat16):
    """A bitsandbytes Linear4bit over the NF4 tensors t (no quantization: its Params4bit wraps them as they are)."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState, get_4bit_type
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import bitsandbytes: {type(exc).__name__}: {exc}") from exc
    n, k = t["shape"]
    dev = t["packed"].device
    state2 = QuantState(absmax=t["absmax2"], code=t["code2"], blocksize=NESTED, dtype=torch.float32)
    state = QuantState(absmax=t["absmax"], shape=torch.Size([n, k]), code=get_4bit_type("nf4", device=dev),
                       blocksize=BLOCKSIZE, quant_type="nf4", dtype=dtype,
                       offset=t["offset"], state2=state2)
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(t["packed"].view(-1, 1), requires_grad=False, quant_state=state,
                                   blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4", module=lin,
                                   bnb_quantized=True)
    lin.quant_state = state
    return lin


def peft_module(inp: dict, names: list[str], r: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A module whose children ``names`` are bitsandbytes Linear4bit over inp[name]'s NF4 tensors, with PEFT LoRA
    injected (see peft_wrap); returns it and the trainable factors."""
    module = torch.nn.Module()
    for name in names:
        setattr(module, name, bnb_linear4bit(inp[name]["nf4"]))
    return module, peft_wrap(module, inp, names, r)


def peft_wrap(module: torch.nn.Module, inp: dict, names: list[str], r: int) -> list[torch.Tensor]:
    """Injects PEFT LoRA (r, alpha 2r, no dropout) into the named Linear4bit children of module and copies our
    factors in; returns the trainable factors [A, B per name]."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import peft: {type(exc).__name__}: {exc}") from exc
    config = LoraConfig(r=r, lora_alpha=int(LORA_ALPHA_OVER_R * r), lora_dropout=0.0, target_modules=names,
                        bias="none")
    inject_adapter_in_model(config, module)
    params = []
    for name in names:
        layer = getattr(module, name)
        for attr, key in (("lora_A", "a"), ("lora_B", "b")):
            lin = getattr(layer, attr)["default"]
            lin.weight = torch.nn.Parameter(inp[name][key].detach().clone(), requires_grad=True)
            params.append(lin.weight)
    return params


def three_d(x: torch.Tensor) -> torch.Tensor:
    """[M, K] as [1, M, K] (Unsloth's LoRA functions unpack batch, seq, hidden)."""
    return x.view(1, *x.shape)
