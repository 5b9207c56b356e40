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

# bitsandbytes' NF4 table (get_4bit_type("nf4"), exact fp32 values), index = the 4-bit code.
_NF4_CODE = tuple(float.fromhex(h) for h in (
    "-0x1p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.94654p-2", "-0x1.23449ap-2", "-0x1.7a6a7ep-3",
    "-0x1.74f0e2p-4", "0x0p+0", "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1p+0"))
NESTED_BLOCKSIZE = 256  # bitsandbytes always double-quantizes the absmax in blocks of 256


class NF4Weight:
    """A frozen weight ``[N, K]`` in bitsandbytes' NF4 layout (flattened row-major, blocks of ``blocksize``
    elements, two codes per byte with the first in the high nibble; ../shared/reference/formats-and-peers.md §1).

    Args:
        packed: uint8 codes, ``ceil(N·K / 2)`` bytes in any shape (bitsandbytes stores ``[n/2, 1]``).
        absmax: float32 ``[nblocks]`` per-block scales, or uint8 ``[nblocks]`` with double quantization.
        shape: ``(N, K)``, the weight's ``[out_features, in_features]``.
        blocksize: elements per block (a power of two in [32, 4096]); K need not be a multiple of it.
        nested_absmax, nested_code: double quantization only: float32 ``[ceil(nblocks / 256)]`` and the
            256-entry dynamic map.
        offset: double quantization only: the mean added back to every decoded scale (a Python float, so the ops
            never wait on the device for it).
        dtype: the original weight's dtype (what :meth:`dequantize` returns by default).
    """

    __slots__ = ("packed", "absmax", "shape", "blocksize", "nested_absmax", "nested_code", "offset", "dtype")

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                 nested_absmax: torch.Tensor | None = None, nested_code: torch.Tensor | None = None,
                 offset: float = 0.0, dtype: torch.dtype = torch.bfloat16):
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"NF4Weight: packed must be a uint8 tensor, got {_describe(packed)}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"NF4Weight: shape must be (out_features, in_features) >= 1, got {shape}")
        if packed.numel() != (shape[0] * shape[1] + 1) // 2:
            raise ValueError(f"NF4Weight: packed must hold {(shape[0] * shape[1] + 1) // 2} bytes for shape {shape}, "
                             f"got {packed.numel()}")
        if (nested_absmax is None) != (nested_code is None):
            raise ValueError("NF4Weight: nested_absmax and nested_code go together (double quantization)")
        self.packed, self.absmax, self.shape, self.blocksize = packed, absmax, shape, int(blocksize)
        self.nested_absmax, self.nested_code, self.offset, self.dtype = nested_absmax, nested_code, float(offset), dtype

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """From packed codes and a QuantState (bitsandbytes' ``bitsandbytes.functional.QuantState`` or one with the
        same attributes: ``absmax, shape, blocksize, quant_type, dtype, offset, state2``). Reads the double-quant
        offset to the host once, here."""
        qt = getattr(quant_state, "quant_type", "nf4")
        if qt != "nf4":
            raise ValueError(f"NF4Weight: quant_type must be 'nf4', got {qt!r}")
        state2 = getattr(quant_state, "state2", None)
        if state2 is None:
            return cls(packed, quant_state.absmax, quant_state.shape, quant_state.blocksize,
                       dtype=quant_state.dtype)
        if int(state2.blocksize) != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4Weight: the nested absmax blocksize must be {NESTED_BLOCKSIZE}, got {state2.blocksize}")
        offset = quant_state.offset
        offset = float(offset.item() if isinstance(offset, torch.Tensor) else offset)
        return cls(packed, quant_state.absmax, quant_state.shape, quant_state.blocksize, state2.absmax, state2.code,
                   offset, quant_state.dtype)

    @classmethod
    def from_bnb(cls, param: Any) -> "NF4Weight":
        """From a quantized ``bitsandbytes.nn.Params4bit`` (e.g. a ``Linear4bit``'s ``weight``)."""
        if getattr(param, "quant_state", None) is None:
            raise ValueError("NF4Weight.from_bnb: the parameter has no quant_state (not quantized yet: move it to the "
                             "device first)")
        return cls.from_quant_state(param.data, param.quant_state)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Plain-PyTorch dequantization to ``[N, K]`` in ``dtype`` (default: the original dtype): fp32
        ``table[code] · scale`` rounded once to ``dtype``, the scale decoded as bitsandbytes does (a rounded
        multiply, then a rounded add of the offset)."""
        n = self.shape[0] * self.shape[1]
        nblocks = -(-n // self.blocksize)
        scale = self.absmax.reshape(-1)[:nblocks]
        if self.nested:
            nested = self.nested_absmax.reshape(-1).repeat_interleave(NESTED_BLOCKSIZE)[:nblocks]
            scale = (self.nested_code.reshape(-1)[scale.long()] * nested) + torch.tensor(
                self.offset, dtype=torch.float32, device=scale.device)
        table = torch.tensor(_NF4_CODE, dtype=torch.float32, device=self.device)
        b = self.packed.reshape(-1)
        codes = torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:n].long()
        values = table[codes] * scale.float().repeat_interleave(self.blocksize)[:n]
        return values.view(self.shape).to(dtype or self.dtype)

    def op_args(self) -> tuple:
        """(packed, absmax, nested_absmax, nested_code, offset, blocksize) as torch.ops.swiftlora.qlora_linear takes
        them."""
        return self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.blocksize

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
        raise ValueError(f"{fn}: the base weight of projection {i} must be [{proj.lora_b.shape[0]}, {k}] (lora_b's rows, "
                         f"the input's last dim), got {list(shape)}")


def op_lists(projs) -> tuple:
    """The per-projection lists torch.ops.swiftlora.qlora_linear(_backward) take, from (weight) to (scale)."""
    cols: list[list] = [[] for _ in range(6)]
    for p in projs:
        if isinstance(p.base, NF4Weight):
            args = p.base.op_args()
        else:
            args = (p.base, None, None, None, 0.0, 0)
        for c, a in zip(cols, args):
            c.append(a)
    return (*cols, [p.lora_a for p in projs], [p.lora_b for p in projs], [float(p.scale) for p in projs])


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__
