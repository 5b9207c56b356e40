"""NF4 quantization of whole tensors into (packed, QuantState), and back, with swiftlora's kernels.

The result is exactly what ``bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics,
quant_type="nf4", quant_storage)`` returns on CUDA (same bytes, same state), so it can be saved, loaded and used by
bitsandbytes, transformers and PEFT; see quant/bnb.py for the Params4bit / Linear4bit side.
"""
from __future__ import annotations

import torch

from ..ops.nf4 import NF4Tensors, nf4_dequantize, nf4_quantize
from ..ops._nf4_tables import nf4_code
from .nf4_state import NESTED_BLOCKSIZE, QuantState

_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """NF4-quantizes ``x`` (any shape, float32/float16/bfloat16) on its device.

    Args:
        blocksize: elements per scale (power of two, 32..4096).
        compress_statistics: double-quantize the scales (Params4bit's and transformers' default for QLoRA).
        quant_storage: dtype the packed bytes are viewed as (bitsandbytes' ``quant_storage``; e.g. bfloat16 for
            FSDP). The byte count ``(x.numel() + 1) // 2`` must be a multiple of its size.
    Returns:
        ``(packed, state)``: packed ``[(x.numel() + 1) // 2 // itemsize, 1]`` of ``quant_storage``, and the
        QuantState (shape and dtype of ``x``).
    """
    if quant_storage not in _STORAGE_DTYPES:
        raise ValueError(f"quantize_nf4: quant_storage must be one of {_STORAGE_DTYPES}, got {quant_storage}")
    q = nf4_quantize(x, blocksize, compress_statistics)
    packed = q.packed
    if quant_storage != torch.uint8:
        size = torch.empty((), dtype=quant_storage).element_size()
        if packed.numel() % size:
            raise ValueError(f"quantize_nf4: {packed.numel()} packed bytes do not fill whole {quant_storage} "
                             f"elements; use quant_storage=torch.uint8 for a tensor of {x.numel()} elements")
        packed = packed.reshape(-1).view(quant_storage).reshape(-1, 1)
    return packed, state_from_tensors(q, x.shape, x.dtype, blocksize)


def state_from_tensors(q: NF4Tensors, shape, dtype: torch.dtype, blocksize: int) -> QuantState:
    """The QuantState of kernel outputs (``NF4Tensors``) for a tensor of ``shape`` and ``dtype``."""
    state2 = None
    if q.absmax2 is not None:
        state2 = QuantState(absmax=q.absmax2, code=q.code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=q.absmax, shape=shape, code=nf4_code(q.absmax.device), blocksize=blocksize,
                      quant_type="nf4", dtype=dtype, offset=q.offset, state2=state2)


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``packed`` + ``state`` encode, in ``dtype`` (default ``state.dtype``) and ``state.shape``.

    Same bits as ``bitsandbytes.functional.dequantize_4bit(packed, state)``. ``packed`` may use any quant_storage.
    """
    state.validate()
    if state.code.device != packed.device or not torch.equal(state.code, nf4_code(packed.device)):
        raise ValueError("dequantize_nf4: state.code (quant_map) must be the NF4 table on packed's device")
    absmax, absmax2, code2, offset = state.kernel_args()
    return nf4_dequantize(packed, absmax, absmax2, code2, offset, blocksize=state.blocksize, shape=state.shape,
                          dtype=dtype or state.dtype)
