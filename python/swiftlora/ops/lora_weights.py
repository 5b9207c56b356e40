"""Frozen base weights of LoRA layers, and the LoRA projections built on them.

A LoRA projection computes ``y = x @ Wᵀ (+ bias) + scale · (dropout(x) @ Aᵀ) @ Bᵀ`` over a frozen base weight
``W [N, K]`` that is either dense (a float32/float16/bfloat16 tensor: 16-bit LoRA) or :class:`NF4Weight`
(bitsandbytes' 4-bit NormalFloat layout: QLoRA). :func:`~swiftlora.ops.qlora_linear`, ``lora_qkv`` and ``lora_mlp``
take :class:`LoRAProjection` objects (or their fields); the base weight never receives a gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch

from .nf4 import DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, nf4_dequantize_reference, nf4_quantize



class NF4Weight:
    """A frozen weight ``[N, K]`` in bitsandbytes' NF4 layout (flattened row-major, blocks of ``blocksize``
    elements, two codes per byte with the first in the high nibble; ../shared/reference/formats-and-peers.md §1),
    held as :func:`~swiftlora.ops.nf4.nf4_dequantize` takes it.

    Args:
        packed: uint8 codes, ``ceil(N·K / 2)`` bytes in any shape (bitsandbytes stores ``[n/2, 1]``).
        absmax: float32 ``[nblocks]`` per-block scales, or uint8 ``[nblocks]`` with double quantization.
        shape: ``(N, K)``, the weight's ``[out_features, in_features]``.
        blocksize: elements per block (a power of two in [32, 4096]); K need not be a multiple of it.
        absmax2, code2, offset: double quantization only: float32 ``[ceil(nblocks / 256)]``, the 256-entry dynamic
            map, and the float32 ``[]`` mean added back to every decoded scale (read on the device: no host sync).
        dtype: the original weight's dtype (what :meth:`dequantize` returns by default).
    """

    __slots__ = ("packed", "absmax", "shape", "blocksize", "absmax2", "code2", "offset", "dtype")

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = DEFAULT_BLOCKSIZE,
                 absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"NF4Weight: packed must be a tensor, got {_describe(packed)}")
        packed = packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)  # quant_storage
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"NF4Weight: shape must be (out_features, in_features) >= 1, got {shape}")
        nested = [t is not None for t in (absmax2, code2, offset)]
        if any(nested) and not all(nested):
            raise ValueError("NF4Weight: absmax2, code2 and offset go together (double quantization)")
        if isinstance(offset, (int, float)):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        self.packed, self.absmax, self.shape, self.blocksize = packed, absmax, shape, int(blocksize)
        self.absmax2, self.code2, self.offset, self.dtype = absmax2, code2, offset, dtype

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """From packed codes and a QuantState: bitsandbytes' ``bitsandbytes.functional.QuantState`` or
        :class:`swiftlora.quant.QuantState` (the same attributes: ``absmax, shape, blocksize, quant_type, dtype,
        offset, state2``)."""
        qt = getattr(quant_state, "quant_type", "nf4")
        if qt != "nf4":
            raise ValueError(f"NF4Weight: quant_type must be 'nf4', got {qt!r}")
        state2 = getattr(quant_state, "state2", None)
        if state2 is None:
            return cls(packed, quant_state.absmax, quant_state.shape, quant_state.blocksize, dtype=quant_state.dtype)
        if int(state2.blocksize) != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4Weight: the nested absmax blocksize must be {NESTED_BLOCKSIZE}, "
                             f"got {state2.blocksize}")
        return cls(packed, quant_state.absmax, quant_state.shape, quant_state.blocksize, state2.absmax, state2.code,
                   quant_state.offset, quant_state.dtype)

    @classmethod
    def from_bnb(cls, param: Any) -> "NF4Weight":
        """From a quantized ``bitsandbytes.nn.Params4bit`` (e.g. a ``Linear4bit``'s ``weight``)."""
        if getattr(param, "quant_state", None) is None:
            raise ValueError("NF4Weight.from_bnb: the parameter has no quant_state (not quantized yet: move it to the "
                             "device first)")
        return cls.from_quant_state(param.data, param.quant_state)

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE,
                 compress_statistics: bool = True) -> "NF4Weight":
        """NF4-quantizes a dense ``[N, K]`` weight (bit-identical to bitsandbytes' ``quantize_4bit``)."""
        t = nf4_quantize(weight, blocksize, compress_statistics)
        return cls(t.packed, t.absmax, weight.shape, blocksize, t.absmax2, t.code2, t.offset, weight.dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Plain-PyTorch dequantization to ``[N, K]`` in ``dtype`` (default: the original dtype), bit-identical to
        bitsandbytes' ``dequantize_4bit`` (:func:`~swiftlora.ops.nf4.nf4_dequantize_reference`); float64 gets the
        exact float32 values."""
        dt = dtype or self.dtype
        out = nf4_dequantize_reference(*self.tensors(), blocksize=self.blocksize, shape=self.shape,
                                       dtype=torch.float32 if dt == torch.float64 else dt)
        return out.to(dt)

    def tensors(self) -> tuple:
        """(packed, absmax, absmax2, code2, offset): the NF4 ops' tensor arguments."""
        return self.packed, self.absmax, self.absmax2, self.code2, self.offset

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={self.shape}, blocksize={self.blocksize}, nested={self.nested}, "
                f"device={self.device}, dtype={self.dtype})")


BaseWeight = Union[torch.Tensor, NF4Weight]


@dataclass(frozen=True)
class LoRAProjection:
    """One LoRA linear: ``x @ baseᵀ (+ bias) + scale · (dropout(x) @ lora_aᵀ) @ lora_bᵀ``.

    Attributes:
        base: frozen ``[N, K]``: an :class:`NF4Weight`, or a dense tensor in the compute dtype (16-bit LoRA).
        lora_a: ``[r, K]`` float32/float16/bfloat16 (trainable).
        lora_b: ``[N, r]`` float32/float16/bfloat16 (trainable).
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
        bias: optional ``[N]``.
    """

    base: BaseWeight
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float = 1.0
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])


def base_shape(base: BaseWeight) -> tuple[int, int]:
    return tuple(base.shape) if isinstance(base, NF4Weight) else tuple(base.shape)


def dense_base(base: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense ``[N, K]`` tensor in ``dtype`` (the references' view of it)."""
    return base.dequantize(dtype) if isinstance(base, NF4Weight) else base.to(dtype)


def check_projection(fn: str, i: int, proj: LoRAProjection, k: int) -> None:
    """Python-side checks the kernels cannot make: types, and that the base weight is frozen and agrees with
    lora_b in shape (the kernels check dtypes, devices and the rest)."""
    if not isinstance(proj, LoRAProjection):
        raise TypeError(f"{fn}: projection {i} must be a LoRAProjection, got {_describe(proj)}")
    for name in ("lora_a", "lora_b"):
        if not isinstance(getattr(proj, name), torch.Tensor):
            raise TypeError(f"{fn}: {name} of projection {i} must be a tensor, got {_describe(getattr(proj, name))}")
    base = proj.base
    if isinstance(base, torch.Tensor):
        if base.requires_grad:
            raise ValueError(f"{fn}: the base weight of projection {i} requires grad; LoRA keeps it frozen "
                             "(set requires_grad=False, or train it outside this op)")
    elif not isinstance(base, NF4Weight):
        raise TypeError(f"{fn}: base of projection {i} must be a tensor or an NF4Weight, got {_describe(base)}")
    shape = base_shape(base)
    if len(shape) != 2 or shape != (proj.lora_b.shape[0], k):
        raise ValueError(f"{fn}: the base weight of projection {i} must be [{proj.lora_b.shape[0]}, {k}] (lora_b's "
                         f"rows, the input's last dim), got {list(shape)}")


def op_lists(projs) -> tuple:
    """The per-projection lists torch.ops.swiftlora.qlora_linear(_backward) take, from (weight) to (scale)."""
    cols: list[list] = [[] for _ in range(6)]
    for p in projs:
        if isinstance(p.base, NF4Weight):
            args = (*p.base.tensors(), p.base.blocksize)
        else:
            args = (p.base, None, None, None, None, 0)
        for c, a in zip(cols, args):
            c.append(a)
    return (*cols, [p.lora_a for p in projs], [p.lora_b for p in projs], [float(p.scale) for p in projs])


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__
