"""QuantState: the metadata of one NF4-quantized tensor, in bitsandbytes' form, without importing bitsandbytes.

Fields and serialization mirror ``bitsandbytes.functional.QuantState`` (reference: shared/reference/
formats-and-peers.md §1.3-1.4), so a state round-trips through bitsandbytes checkpoints byte for byte:

- ``absmax``: per-block scale, float32 ``[nblocks]``; with double quantization (``nested``) uint8 ``[nblocks]``,
  indices into ``state2.code``.
- ``shape``: the original tensor's shape (``[out_features, in_features]`` for a linear weight).
- ``code``: the NF4 table, float32 ``[16]``.
- ``dtype``: the original dtype (what dequantization returns by default).
- ``blocksize``: elements per block (power of two, 32..4096).
- ``quant_type``: ``"nf4"`` (``"fp4"`` is bitsandbytes' other 4-bit type; swiftlora does not implement it).
- ``offset``: float32 ``[]``, the mean of the fp32 absmax (nested only).
- ``state2``: nested only: a QuantState with ``absmax`` float32 ``[ceil(nblocks / 256)]``, ``code`` the 8-bit
  dynamic map float32 ``[256]``, ``blocksize`` 256, ``dtype`` float32.

The scale of NF4 block ``b`` is ``absmax[b]`` or, nested, ``fp32(state2.code[absmax[b]] * state2.absmax[b // 256])
+ offset``. The packed codes live in the weight tensor itself (uint8 ``[(n + 1) // 2, 1]``), not in the state.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
# Keys a bitsandbytes state dict (with the prefix "<module>.weight." stripped) may hold, tensors and non-tensors.
_VALID_KEYS = frozenset({"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
                         "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"})
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as bitsandbytes writes it in the JSON blob."""
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"QuantState: {key}={name!r} is not a torch dtype name")
    return dtype


class QuantState:
    """Metadata of one NF4-quantized tensor (see the module docstring for every field's shape and dtype)."""

    def __init__(self, absmax: torch.Tensor, shape=None, code: torch.Tensor | None = None, blocksize: int | None = None,
                 quant_type: str | None = None, dtype: torch.dtype | None = None, offset: torch.Tensor | None = None,
                 state2: QuantState | None = None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """Whether the block scales are double-quantized (``absmax`` uint8 + ``state2`` + ``offset``)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        """Number of quantized elements (the product of ``shape``)."""
        return math.prod(self.shape)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(absmax, absmax2, code2, offset)`` as the swiftlora NF4 ops take them (the last three None unless nested)."""
        if not self.nested:
            return self.absmax, None, None, None
        return self.absmax, self.state2.absmax, self.state2.code, self.offset

    def to(self, device) -> QuantState:
        """Moves every tensor to ``device`` in place (as bitsandbytes' QuantState.to does) and returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    # ------------------------------------------------------------------------------------------ serialization
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serializes it (same keys, values and order).

        Unpacked: tensors and plain values (``quant_type``, ``blocksize``, ``dtype`` as a name, ``shape`` as a
        tuple, and nested ``nested_blocksize``, ``nested_dtype``, ``nested_offset`` as a Python float). Packed
        (``packed=True``, what ``Linear4bit`` saves under ``<prefix>.weight.``): the tensors plus one uint8 tensor
        ``quant_state.bitsandbytes__nf4`` holding the plain values as UTF-8 JSON.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),  # not shared: safetensors drops shared tensors
                "nested_dtype": dtype_name(self.state2.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed or self.quant_type is None:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        out[PACKED_KEY_PREFIX + self.quant_type] = _pack_json(plain)
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """A state from bitsandbytes' packed or unpacked dict (keys may keep a ``<prefix>.weight.`` prefix).

        Raises ValueError naming the problem for a missing/unknown key, a non-NF4 quant type, a bad blocksize, or
        tensors whose sizes do not match ``shape`` and ``blocksize``.
        """
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"QuantState.from_dict: more than one packed quant_state tensor: {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if not suffix.startswith("bitsandbytes__"):
                raise ValueError(f"QuantState.from_dict: {key!r} must end in 'bitsandbytes__nf4'")
            d.update(_unpack_json(d.pop(key), key))
        d = {k.split(".")[-1]: v for k, v in d.items()}  # strip "<module>.weight." prefixes
        if "quant_type" not in d:
            raise ValueError("QuantState.from_dict: expected a packed 'quant_state.bitsandbytes__nf4' tensor or the "
                             f"unpacked keys (quant_type, blocksize, ...), got keys {sorted(qs_dict)}")
        unknown = sorted(set(d) - _VALID_KEYS)
        if unknown:
            raise ValueError(f"QuantState.from_dict: unknown keys {unknown}")
        for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if k not in d:
                raise ValueError(f"QuantState.from_dict: missing key {k!r}")
        state2, offset = None, None
        if "nested_absmax" in d:
            for k in ("nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"):
                if k not in d:
                    raise ValueError(f"QuantState.from_dict: nested state without key {k!r}")
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(absmax=d["nested_absmax"].to(device), blocksize=int(d["nested_blocksize"]),
                         code=d["nested_quant_map"].to(device),
                         dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"))
        state = cls(absmax=d["absmax"].to(device), shape=d["shape"], code=d["quant_map"].to(device),
                    blocksize=int(d["blocksize"]), quant_type=d["quant_type"],
                    dtype=_dtype_from_name(d["dtype"], "dtype"), offset=offset, state2=state2)
        state.validate()
        return state

    def validate(self) -> None:
        """Raises ValueError unless this is a well-formed NF4 state (types, dtypes and sizes consistent)."""
        if self.quant_type != "nf4":
            raise ValueError(f"QuantState: quant_type must be 'nf4' (swiftlora implements NF4 only), got "
                             f"{self.quant_type!r}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"QuantState: blocksize must be a power of two in 32..4096, got {self.blocksize}")
        if self.shape is None:
            raise ValueError("QuantState: shape is required")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"QuantState: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.code is None or self.code.shape != (16,) or self.code.dtype != torch.float32:
            raise ValueError("QuantState: code (quant_map) must be a float32 [16] tensor, got "
                             f"{None if self.code is None else (self.code.dtype, tuple(self.code.shape))}")
        nblocks = -(-self.numel // self.blocksize)
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nblocks:
            raise ValueError(f"QuantState: absmax must be {want} with {nblocks} elements (shape {tuple(self.shape)}, "
                             f"blocksize {self.blocksize}), got {self.absmax.dtype} {tuple(self.absmax.shape)}")
        if not self.nested:
            return
        s2 = self.state2
        if s2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"QuantState: nested blocksize must be {NESTED_BLOCKSIZE}, got {s2.blocksize}")
        n2 = -(-nblocks // NESTED_BLOCKSIZE)
        if s2.absmax.dtype != torch.float32 or s2.absmax.numel() != n2:
            raise ValueError(f"QuantState: nested_absmax must be float32 with {n2} elements, got {s2.absmax.dtype} "
                             f"{tuple(s2.absmax.shape)}")
        if s2.code is None or s2.code.shape != (256,) or s2.code.dtype != torch.float32:
            raise ValueError("QuantState: nested_quant_map must be a float32 [256] tensor")
        if self.offset is None or self.offset.numel() != 1 or self.offset.dtype != torch.float32:
            raise ValueError("QuantState: offset must be a float32 scalar tensor when nested")

    def __repr__(self) -> str:
        nested = f", nested(absmax2={tuple(self.state2.absmax.shape)}, offset={self.offset.item():.6g})" \
            if self.nested else ""
        return (f"QuantState({self.quant_type}, shape={tuple(self.shape) if self.shape is not None else None}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, absmax={self.absmax.dtype}"
                f"{tuple(self.absmax.shape)}{nested})")


def _pack_json(plain: dict[str, Any]) -> torch.Tensor:
    """bitsandbytes' pack_dict_to_tensor: ``json.dumps`` (default separators) as a uint8 tensor."""
    return torch.tensor(list(json.dumps(plain).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor, key: str) -> dict[str, Any]:
    if t.dtype != torch.uint8:
        raise ValueError(f"QuantState.from_dict: {key!r} must be a uint8 tensor of UTF-8 JSON, got {t.dtype}")
    try:
        d = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"QuantState.from_dict: {key!r} does not hold UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"QuantState.from_dict: {key!r} must hold a JSON object, got {type(d).__name__}")
    return d
