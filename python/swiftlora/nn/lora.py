"""PEFT LoRA layers as swiftlora's fused LoRA kernels take them.

A PEFT LoRA layer (``peft.tuners.lora`` over an ``nn.Linear`` or a bitsandbytes NF4 ``Linear4bit``) becomes an
:class:`swiftlora.ops.LoRAProjection` (frozen base: :class:`swiftlora.ops.NF4Weight` or the dense weight; the
adapter's A and B Parameters themselves, so their gradients land where PEFT and the optimizer expect them). The
attention and MLP modules then run the fused ``lora_qkv`` / ``qlora_linear`` / ``lora_mlp`` ops instead of the layers'
own forwards.

:func:`linear` runs any projection: a plain (adapter-less) NF4 ``Linear4bit`` given a decode-sized 16-bit input
without gradient goes through swiftlora's NF4 GEMV (the packed weight read once, no dequantized copy); everything else
through the module's own forward.

A LoRA layer stays on its own forward (None from :func:`lora_projection`) when the kernels do not cover it: adapters
disabled or merged, more or other than one active adapter, DoRA, LoRA bias, a base that is neither NF4 nor a dense
weight of the input's dtype, bitsandbytes' repacked CPU inference layout, or autocast to a dtype other than the
input's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_weights import LoRAProjection, NF4Weight
from ..ops.nf4 import nf4_gemv

# Rows up to which nf4_gemv beats bitsandbytes' dequantize + matmul: on the H100 (W [14336, 4096]) 24.5 µs at M = 1
# and 28.8 at M = 4 (tensor-core kernel), but 99 µs at M = 8 and 304 at M = 16, where dequantizing (57 µs) and
# a bf16 GEMV over the 117 MB weight (~40 µs at copy bandwidth) cost less (bench/NOTES.md).
GEMV_MAX_ROWS = 4


def _adapter(module: nn.Module) -> str | None:
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None
    active = list(getattr(module, "active_adapters", ()))
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if getattr(module, "use_dora", {}).get(name, False) or getattr(module, "lora_bias", {}).get(name, False):
        return None
    if getattr(module, "fan_in_fan_out", False) or not isinstance(module.lora_A[name], nn.Linear):
        return None
    return name


def _nf4(module: nn.Module) -> NF4Weight | None:
    """The NF4 weight of a bitsandbytes Linear4bit in the standard layout (else None)."""
    if type(module).__name__ != "Linear4bit":
        return None
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return None
    return NF4Weight.from_bnb(module.weight)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; see the module docstring for the NF4 GEMV case."""
    if (x.dtype in (torch.float16, torch.bfloat16) and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        weight = _nf4(module)
        if weight is not None:
            y = nf4_gemv(x, *weight.tensors(), blocksize=weight.blocksize, out_features=weight.shape[0])
            return y if module.bias is None else y + module.bias.to(y.dtype)
    return module(x)


def _base_weight(base: nn.Module, x: torch.Tensor):
    if type(base).__name__ == "Linear4bit":
        return _nf4(base)
    if isinstance(base, nn.Linear) and base.weight.dtype == x.dtype:
        return base.weight
    return None


def lora_projection(module: nn.Module, x: torch.Tensor) -> tuple[LoRAProjection, float] | None:
    """``(projection, dropout probability)`` of a PEFT LoRA layer for input ``x``, or None (see the module
    docstring)."""
    name = _adapter(module)
    if name is None:
        return None
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != x.dtype:
        return None
    base = module.get_base_layer()
    weight = _base_weight(base, x)
    if weight is None:
        return None
    dropout = module.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and module.training else 0.0
    proj = LoRAProjection(weight, module.lora_A[name].weight, module.lora_B[name].weight,
                          float(module.scaling[name]), base.bias)
    return proj, p


def lora_projections(modules, x: torch.Tensor) -> tuple[list[LoRAProjection], float] | None:
    """Projections of several LoRA layers reading the same ``x`` (one dropout probability), or None when any of
    them cannot run fused."""
    found = [lora_projection(m, x) for m in modules]
    if any(f is None for f in found) or len({p for _, p in found}) != 1:
        return None
    return [proj for proj, _ in found], found[0][1]
