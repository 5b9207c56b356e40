"""bitsandbytes interop: swiftlora-quantized weights as standard ``bitsandbytes.nn.Params4bit`` / ``Linear4bit``
modules (what PEFT and transformers recognise and save), and bitsandbytes weights dequantized by our kernels.

Nothing here calls a bitsandbytes quantize or dequantize function: the bytes come from swiftlora's kernels, which
match bitsandbytes' CUDA output bit for bit, and the state goes through bitsandbytes' own loader
(``Params4bit.from_prequantized``), the path transformers takes for a prequantized checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch

from .._compat import fix_bnb_cpu_dequantize, keep_bnb_standard_layout
from .nf4 import dequantize_nf4, quantize_nf4
from .nf4_state import QuantState


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("this needs bitsandbytes (pip install bitsandbytes); swiftlora's own NF4 ops do not")\
            from e
    fix_bnb_cpu_dequantize()  # the modules made here dequantize through it on CPU (PEFT's merge, bnb's matmul)
    return bitsandbytes


def to_bnb_quant_state(state: QuantState) -> Any:
    """Our QuantState as a ``bitsandbytes.functional.QuantState`` (tensors shared, not copied)."""
    bnb = _bnb()
    state.validate()
    state2 = None
    if state.nested:
        s2 = state.state2
        state2 = bnb.functional.QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    return bnb.functional.QuantState(absmax=state.absmax, shape=state.shape, code=state.code,
                                     blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                                     offset=state.offset, state2=state2)


def from_bnb_quant_state(bnb_state: Any) -> QuantState:
    """A ``bitsandbytes.functional.QuantState`` as ours (tensors shared). Raises ValueError for a non-NF4 state."""
    state2 = None
    if getattr(bnb_state, "state2", None) is not None:
        s2 = bnb_state.state2
        state2 = QuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    state = QuantState(absmax=bnb_state.absmax, shape=bnb_state.shape, code=bnb_state.code,
                       blocksize=bnb_state.blocksize, quant_type=bnb_state.quant_type, dtype=bnb_state.dtype,
                       offset=bnb_state.offset if state2 is not None else None, state2=state2)
    state.validate()
    return state


def quantize_linear_to_bnb(linear: torch.nn.Linear, blocksize: int = 64, compress_statistics: bool = True,
                           quant_storage: torch.dtype = torch.uint8,
                           compute_dtype: torch.dtype | None = None) -> Any:
    """A ``bitsandbytes.nn.Linear4bit`` (quant_type "nf4") holding ``linear``'s weight quantized by swiftlora.

    The weight is quantized on its own device (CPU or CUDA) with our kernels; the module is what
    ``Linear4bit(...).to("cuda")`` would have produced there (bias copied, frozen packed weight). Its
    ``state_dict`` has bitsandbytes' checkpoint keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``).

    Args:
        linear: an ``nn.Linear`` with a float32/float16/bfloat16 weight ``[out_features, in_features]``.
        blocksize, compress_statistics, quant_storage: as ``bitsandbytes.nn.Linear4bit`` / ``quantize_4bit``.
        compute_dtype: Linear4bit's compute dtype (None: taken from the first input, as bitsandbytes does).
    """
    bnb = _bnb()
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"quantize_linear_to_bnb: expected an nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    packed, state = quantize_nf4(weight, blocksize, compress_statistics, quant_storage)
    module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                               quant_type="nf4", quant_storage=quant_storage, device="meta")
    module.weight = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), requires_grad=False,
                                                        device=weight.device, module=module)
    if linear.bias is not None:
        module.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    keep_bnb_standard_layout(module)  # no repacking into bitsandbytes' AVX512-BF16 CPU layout behind our back
    return module.train(linear.training)


def dequantize_bnb_weight(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of a ``Params4bit`` (NF4; any quant_storage, nested or not), dequantized by swiftlora's
    kernel: bit-identical to ``bitsandbytes.functional.dequantize_4bit(param, param.quant_state)``.

    Returns a ``quant_state.shape`` tensor in ``dtype`` (default: the original dtype).
    """
    bnb_state = getattr(param, "quant_state", None)
    if bnb_state is None:
        raise ValueError("dequantize_bnb_weight: the parameter has no quant_state (not a quantized Params4bit)")
    if getattr(bnb_state, "packing_format_for_cpu", False):
        raise ValueError("dequantize_bnb_weight: the weight is in bitsandbytes' repacked CPU inference layout; "
                         "save and reload the module (its state_dict restores the standard layout)")
    return dequantize_nf4(param.data, from_bnb_quant_state(bnb_state), dtype)


def linear_from_bnb(module: Any, dtype: torch.dtype | None = None) -> torch.nn.Linear:
    """A plain ``nn.Linear`` with the dequantized weight of a ``bitsandbytes.nn.Linear4bit`` (NF4)."""
    weight = dequantize_bnb_weight(module.weight, dtype)
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = torch.nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return linear
